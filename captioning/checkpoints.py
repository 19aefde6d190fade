"""Trainer checkpoints on disk: which are complete, and which one a --resume continues from."""

import json
import os
import re
import sys

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
