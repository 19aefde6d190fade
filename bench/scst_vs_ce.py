"""The SCST experiment of issue 13, end to end on the built-in shapes set: for each seed,
train CE for 10 epochs with the demo's settings, then continue from that model (--init_from)
once by CE for 10 more epochs and once by SCST for the same time, and compare test CIDEr.

    python bench/scst_vs_ce.py --ratio R [--seeds 1 2] [--out data/scst_vs_ce]

"The same time" is set in steps, so that the load of a shared machine doesn't decide it:
the SCST run gets round(CE steps / R) optimizer steps, R being the SCST/CE step-time ratio
that `python bench/scst.py` measured (batch 16, 5 samples), and evaluates as often (10
times). Both runs' measured wall times are printed next to their scores. Runs whose
metrics.json already exists are reused, so an interrupted experiment continues.
Extra SCST options (learning rate, samples, baseline) go after --scst_args.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = ["--batch_size", "16", "--lr", "1e-3", "--warmup_steps", "50", "--logging_steps", "100",
        "--quiet"]


def train(out, runs, *extra):
    """Run train.py into `out` unless it finished before; -> its metrics.json."""
    metrics = os.path.join(out, "metrics.json")
    if not os.path.isfile(metrics):
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--output_dir", out,
               "--overwrite", "--runs_dir", runs, "--run_name", os.path.basename(out), *extra]
        print("$ " + " ".join(cmd[1:]), flush=True)
        began = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        print(f"  {time.time() - began:.0f} s wall", flush=True)
    with open(metrics, encoding="utf-8") as f:
        return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratio", type=float, required=True,
                   help="SCST step time / CE step time, from bench/scst.py")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="seeds, one run each")
    p.add_argument("--out", default="data/scst_vs_ce", help="where data and models go")
    p.add_argument("--epochs", type=int, default=10, help="CE epochs, before and after")
    p.add_argument("--scst_args", nargs=argparse.REMAINDER, default=[],
                   help="extra train.py options for the SCST run (e.g. --lr 1e-4)")
    args = p.parse_args(argv)
    data, runs = os.path.join(args.out, "processed"), os.path.join(args.out, "runs")
    if not os.path.isfile(os.path.join(data, "manifest.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "dataloader.py"), "--source",
                        "shapes", "--coco_dir", os.path.join(args.out, "shapes_coco"),
                        "--save_path", data, "--encoder_model", "tiny", "--decoder_model",
                        "tiny", "--val_size", "50", "--test_size", "100", "--overwrite",
                        "--quiet"], check=True)
    tag = "scst" + "".join(a.strip("-").replace("scst_", "") for a in args.scst_args)
    rows = []
    for seed in args.seeds:
        common = ["--data_path", data, "--seed", str(seed)]
        base = os.path.join(args.out, f"ce{args.epochs}_s{seed}")
        train(base, runs, *common, *DEMO, "--epochs", str(args.epochs))
        ce = train(os.path.join(args.out, f"ce{args.epochs}+ce{args.epochs}_s{seed}"), runs,
                   *common, *DEMO, "--epochs", str(args.epochs), "--init_from", base)
        steps = max(10, round(ce["train"]["global_step"] / args.ratio))
        sc = train(os.path.join(args.out, f"ce{args.epochs}+{tag}{steps}_s{seed}"), runs,
                   *common, "--batch_size", "16", "--logging_steps", "20", "--quiet",
                   "--init_from", base, "--scst", "--max_steps", str(steps),
                   "--save_steps", str(max(1, steps // 10)), *args.scst_args)
        start = json.load(open(os.path.join(base, "metrics.json")))["test"]["cider"]
        rows.append((seed, start, ce, sc, steps))
    print(f"\n| seed | CE {args.epochs} ep: test CIDEr | + CE {args.epochs} ep | wall s | "
          f"+ SCST ({tag}) | steps | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for seed, start, ce, sc, steps in rows:
        print(f"| {seed} | {start:.3f} | {ce['test']['cider']:.3f} | "
              f"{ce['train']['train_runtime']:.0f} | {sc['test']['cider']:.3f} | {steps} | "
              f"{sc['train']['train_runtime']:.0f} |")


if __name__ == "__main__":
    main()
