"""What a self-critical (SCST) training step costs against a cross-entropy one, side by side
in one run, on a trained demo-sized model and its data:

- CE: train.py's CaptionTrainer at --batch_size.
- SCST: train.py --scst's SCSTTrainer at the same --batch_size, --samples captions per image
  (sampling, rewards, the scoring pass and the backward pass).
- reward share: SCSTTrainer at --reward_images images x --samples samples; the seconds spent
  in the reward (decode, PTB tokenising, CIDEr-D) over the seconds of the whole step.

    python bench/scst.py [--data data/demo/processed] [--model data/demo/model]

(`make demo` writes those two.) Each side: --warmup steps left out, then --steps timed,
best of --repeats interleaved runs (this machine is shared and noisy; every run is printed
too, so the spread behind the best is visible). The SCST side is
timed twice per repeat: cold, with a reward whose per-image reference tables are empty,
as in a run's first epoch, where each image's table is built on its first draw; and
warm, with every table built before timing, as in later epochs (the time to build them
all is printed). The reward share is measured cold. Targets: SCST step <= 3x the CE step;
reward < 10% of an SCST step at 50 images x 5 samples.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from captioning.cli import configure_runtime, quiet_transformers  # noqa: E402


def run(side, model_dir, data, args, batch, out, reward=None):
    """-> (seconds per timed step, seconds in the reward per timed step)."""
    from transformers import Seq2SeqTrainingArguments, TrainerCallback

    from captioning.modeling import load_image_processor, load_model_strict, load_tokenizer
    from captioning.scst import SCSTCollator, SCSTTrainer, SCSTView
    from captioning.trainer import CaptionCollator, CaptionTrainer, TrainView

    stamps, reward_seconds = [], []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())
            reward_seconds.append(timed.total)

    class TimedReward:
        total = 0.0

        def __call__(self, *a):
            began = time.perf_counter()
            try:
                return reward(*a)
            finally:
                self.total += time.perf_counter() - began

    timed = TimedReward()
    targs = Seq2SeqTrainingArguments(
        output_dir=out, max_steps=args.warmup + args.steps, per_device_train_batch_size=batch,
        learning_rate=1e-5, save_strategy="no", eval_strategy="no", report_to="none",
        logging_strategy="no", disable_tqdm=True, remove_unused_columns=False,
        dataloader_pin_memory=False, use_cpu=True, seed=0)
    processor, tokenizer = load_image_processor(data), load_tokenizer(data)
    common = dict(model=load_model_strict(model_dir), args=targs, eval_collator=None,
                  score=None, processing_class=tokenizer, callbacks=[StepClock()])
    if side == "ce":
        trainer = CaptionTrainer(train_dataset=TrainView(args.train, 0),
                                 data_collator=CaptionCollator(processor), **common)
    else:
        trainer = SCSTTrainer(train_dataset=SCSTView(args.train, 0),
                              data_collator=SCSTCollator(processor), reward=timed,
                              samples=args.samples, baseline="mean", **common)
    trainer.train()
    steps = len(stamps) - args.warmup
    seconds = (stamps[-1] - stamps[args.warmup - 1]) / steps
    return seconds, (reward_seconds[-1] - reward_seconds[args.warmup - 1]) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/demo/processed", help="dataloader.py output")
    p.add_argument("--model", default="data/demo/model", help="a CE-trained train.py output")
    p.add_argument("--batch_size", type=int, default=16, help="images per step, CE and SCST")
    p.add_argument("--samples", type=int, default=5, help="SCST captions per image")
    p.add_argument("--reward_images", type=int, default=50,
                   help="images per step for the reward-share measurement")
    p.add_argument("--warmup", type=int, default=3, help="steps not timed, on every side")
    p.add_argument("--steps", type=int, default=10, help="timed steps per side")
    p.add_argument("--repeats", type=int, default=2,
                   help="interleaved runs of each side; the best of each is reported")
    args = p.parse_args(argv)
    for path in (args.data, args.model):
        if not os.path.isdir(path):
            sys.exit(f"bench/scst.py: {path} not found; run `make demo` first, or pass "
                     f"--data and --model")

    import torch

    from captioning.scst import make_reward
    from captioning.store import load_split

    configure_runtime()
    quiet_transformers()
    args.train = load_split(args.data, "train")
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        warm = make_reward(args.train, args.data, tmp, is_main=True)
        loaded = time.perf_counter() - began
        began = time.perf_counter()
        for image in range(len(args.train)):
            warm.table(image)
        built = time.perf_counter() - began
        results = {"ce": [], "cold": [], "warm": [], "share": []}
        for _ in range(args.repeats):
            results["ce"].append(run("ce", args.model, args.data, args, args.batch_size,
                                     os.path.join(tmp, "ce"))[0])
            cold = make_reward(args.train, args.data, tmp, is_main=False)  # no tables yet
            results["cold"].append(run("scst", args.model, args.data, args, args.batch_size,
                                       os.path.join(tmp, "scst"), cold)[0])
            results["warm"].append(run("scst", args.model, args.data, args, args.batch_size,
                                       os.path.join(tmp, "scst"), warm)[0])
            cold = make_reward(args.train, args.data, tmp, is_main=False)
            results["share"].append(run("scst", args.model, args.data, args,
                                        args.reward_images, os.path.join(tmp, "share"), cold))
    ce, cold, warm = min(results["ce"]), min(results["cold"]), min(results["warm"])
    step, in_reward = min(results["share"])
    print(f"model {args.model}, {len(args.train)} training images, {args.steps} timed steps "
          f"after {args.warmup}, best of {args.repeats}, {torch.get_num_threads()} threads")
    print(f"references: cache/count {loaded:.2f} s, reference tables for all images "
          f"{built:.2f} s")
    print(f"CE   step at batch {args.batch_size}: {ce * 1000:8.1f} ms")
    for name, sc in (("cold", cold), ("warm", warm)):
        print(f"SCST step at batch {args.batch_size} x {args.samples} samples, {name} reward "
              f"tables: {sc * 1000:8.1f} ms  -> {sc / ce:.2f}x the CE step (target <= 3x)")
    # Every repeat, in the order run, so that a reader sees the spread behind the best-of.
    for name in ("ce", "cold", "warm"):
        print(f"  {name:4} runs (ms): " + " ".join(f"{t * 1000:.1f}" for t in results[name]))
    ratios = sorted(c / e for c, e in zip(results["cold"], results["ce"]))
    print("  cold/CE within each repeat: " + " ".join(f"{r:.2f}" for r in ratios)
          + f" (median {statistics.median(ratios):.2f})")
    print(f"SCST step at {args.reward_images} images x {args.samples} samples, cold tables: "
          f"{step * 1000:.1f} ms, of which reward {in_reward * 1000:.1f} ms "
          f"= {100 * in_reward / step:.1f}% (target < 10%)")


if __name__ == "__main__":
    main()
