"""Trainer checkpoints on disk: which are complete, which one a --resume continues from, and
where a resumed run goes on writing its TensorBoard events."""

import json
import os
import re
import sys
import time

CHECKPOINT_FILES = ("optimizer.pt", "scheduler.pt", "config.json")


def is_complete_checkpoint(path):
    """Trainer writes trainer_state.json last: a checkpoint killed while being saved has
    none, or half of one, and must not be resumed from."""
    from safetensors import safe_open

    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            json.load(f)
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            f.keys()
    except (OSError, ValueError):
        return False
    return all(os.path.isfile(os.path.join(path, name)) for name in CHECKPOINT_FILES)


def checkpoint_step(path):
    match = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def find_resume_checkpoint(output_dir):
    """The newest complete checkpoint-N in output_dir, or None."""
    steps = sorted((step, name) for name in os.listdir(output_dir)
                   if (step := checkpoint_step(name)) is not None)
    for _, name in reversed(steps):
        path = os.path.join(output_dir, name)
        if is_complete_checkpoint(path):
            return path
        print(f"skipping incomplete checkpoint {path}", file=sys.stderr)
    return None


def checkpoint_to_resume(args):
    """-> the checkpoint to resume from, or None. Nothing a user trained earlier is lost by a
    typo: a non-empty --output_dir needs --resume or --overwrite. Raises ValueError."""
    if args.resume_from:
        if not is_complete_checkpoint(args.resume_from):
            raise ValueError(f"--resume_from {args.resume_from} is not a complete checkpoint")
        return args.resume_from
    non_empty = os.path.isdir(args.output_dir) and os.listdir(args.output_dir)
    if args.resume:
        checkpoint = find_resume_checkpoint(args.output_dir) if non_empty else None
        if checkpoint is None:
            raise ValueError(f"--resume: no complete checkpoint in {args.output_dir}")
        return checkpoint
    if non_empty and not args.overwrite:
        raise ValueError(f"--output_dir {args.output_dir} is not empty; pass --resume to "
                         f"continue its training or --overwrite to replace it")
    return None


def tensorboard_dir(args, resume_from):
    """runs/<run_name>; a resumed run goes on writing into the directory it started."""
    if args.run_name is None and resume_from:
        previous = os.path.join(args.output_dir, "train_args.json")
        if os.path.isfile(previous):
            with open(previous, encoding="utf-8") as f:
                return json.load(f)["tensorboard"]
    return os.path.join(args.runs_dir, args.run_name or time.strftime("%Y%m%d-%H%M%S"))
