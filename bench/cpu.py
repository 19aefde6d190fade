"""Captioning on the CPU in each --precision mode, side by side in one run, and inference.py
under torchrun with 2 processes against 1.

    python bench/cpu.py [--images 8] [--images_b1 2] [--repeats 2] [--modes fp32 int8]
                        [--threads 1] [--model DIR] [--demo data/demo]

The full-size architecture (ViT-B/16 at 224 px + GPT-2 124M with 50,257 tokens) in local
folders shaped like the Hub's, random weights (no network here), joined and saved the way
train.py saves a model, then loaded through inference.py's path (captioner.load_captioner,
caption_pixels). Beam 3, exactly 16 new tokens (min_new_tokens = max_new_tokens, so no mode
stops early).

Fair on a shared machine: each mode runs in its own process (so that its peak RSS is its
own), and all of them are alive at once. Each loads the model and makes one warm-up generate
(1 image, 2 tokens); then the timed passes run round-robin, one mode at a time: repeat 1 is
every mode over --images_b1 images at batch 1, then every mode over --images images at batch
8; repeat 2 the same; and so on. A change in the machine's load therefore hits every mode
alike, and each mode's figure is its best of --repeats. Every timed pass prints the load
average when it ended. Reports images/s, the ratio to the first mode (fp32), peak RSS and the
model's size in memory.

bf16 is not in the default modes: on a CPU without native bf16 (no AVX512-BF16 or AMX, such
as the AVX2-only AMD EPYC this was written on) its matrix multiplies are emulated, and the
encoder alone ran 5-10x slower than fp32, so a default run with it would take most of its
time in bf16 at batch 8. `--modes fp32 bf16 int8` adds it (every mode does the same work).

The quality rows: make demo's model captions its test split in each mode; the share of
captions identical to fp32's and test CIDEr against fp32's (Python PTB tokeniser on every side).

The torchrun row: inference.py on --ratio_images JPEGs with the demo-sized tiny model
(random weights), wall time of the whole command, 2 processes (one thread each) vs 1
(all threads), the same command otherwise.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GENERATE = dict(num_beams=3, min_new_tokens=16, max_new_tokens=16)


def build_full_size(folder):
    """Hub-shaped ViT-B/16 and GPT-2 folders (tests/test_rehearsal.py's recipe), joined into a
    captioner folder with its tokenizer and image processor."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_rehearsal import gpt2_shaped_tokenizer_files
    from transformers import (GPT2Config, GPT2LMHeadModel, ViTConfig, ViTImageProcessor,
                              ViTModel)

    from captioning.modeling import build_model, load_image_processor, load_tokenizer

    vit, gpt, out = (os.path.join(folder, n) for n in ("vit", "gpt2", "captioner"))
    ViTModel(ViTConfig()).save_pretrained(vit)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(vit)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(gpt)
    gpt2_shaped_tokenizer_files(gpt)
    tokenizer = load_tokenizer(gpt)
    model = build_model(vit, gpt, tokenizer, (224, 224), max_new_tokens=16, num_beams=3)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    load_image_processor(vit).save_pretrained(out)
    return out


def worker(args):
    """One mode, in its own process: load and warm up, say so, then run each pass the parent
    asks for on stdin ({"batch": b, "count": n}) and answer its seconds; on end of input,
    answer the peak RSS. Replies are the stdout lines that start with @@."""
    import resource

    import numpy as np
    import torch

    from captioning.captioner import caption_pixels, load_captioner
    from captioning.quantize import model_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    model, tokenizer, processor = load_captioner(args.model, "cpu", args.mode)
    size = model_bytes(model)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (max(args.images, args.images_b1), 3, 224, 224), np.uint8)
    caption_pixels(pixels[:1], model, tokenizer, processor, num_beams=3, min_new_tokens=2,
                   max_new_tokens=2)  # warm-up: first-call allocations, quantized kernels
    _reply({"mode": args.mode, "threads": torch.get_num_threads(), "model_mb": size / 2**20,
            "ready_s": time.perf_counter() - began})
    for line in sys.stdin:
        ask = json.loads(line)
        batch, count = ask["batch"], ask["count"]
        start = time.perf_counter()
        for first in range(0, count, batch):
            caption_pixels(pixels[first:first + batch], model, tokenizer, processor, **GENERATE)
        _reply({"seconds": time.perf_counter() - start})
    _reply({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def _reply(obj):
    print("@@" + json.dumps(obj), flush=True)


class Worker:
    """The parent's handle on one mode's worker process."""

    def __init__(self, mode, model, args):
        self.mode = mode
        self.p = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--mode", mode, "--model", model,
             "--images", str(args.images), "--images_b1", str(args.images_b1),
             "--threads", str(args.threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def read(self):
        for line in self.p.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"bench/cpu.py worker for {self.mode} died (rc {self.p.wait()})")

    def run(self, batch, count):
        self.p.stdin.write(json.dumps({"batch": batch, "count": count}) + "\n")
        self.p.stdin.flush()
        return self.read()["seconds"]

    def finish(self):
        self.p.stdin.close()
        peak = self.read()["peak_rss_mb"]
        self.p.wait()
        return peak


def timed_rows(model, args):
    """All modes' workers alive at once, loaded and warmed up; then the timed passes
    round-robin (repeat 1: every mode at batch 1, then every mode at batch 8; repeat 2: ...),
    so a change in the machine's load hits every mode alike. -> one row per mode."""
    workers = [Worker(mode, model, args) for mode in args.modes]
    try:
        rows = []
        for w in workers:  # the workers load in parallel; this waits for each in turn
            rows.append(w.read())
            print(f"  {w.mode}: loaded + warmed up in {rows[-1]['ready_s']:.0f} s", flush=True)
        for rep in range(1, args.repeats + 1):
            for batch, count in ((1, args.images_b1), (8, args.images)):
                for w, row in zip(workers, rows):
                    seconds = w.run(batch, count)
                    row[f"b{batch}"] = max(row.get(f"b{batch}", 0), count / seconds)
                    print(f"  repeat {rep} batch {batch} {w.mode:>5}: {count / seconds:.3f} "
                          f"img/s (load average {os.getloadavg()[0]:.1f})", flush=True)
        for w, row in zip(workers, rows):
            row["peak_rss_mb"] = w.finish()
        return rows
    finally:
        for w in workers:
            if w.p.poll() is None:
                w.p.kill()


def torchrun_ratio(folder, images):
    """inference.py wall time, 2 processes vs 1, on the tiny model -> (t1, t2)."""
    import numpy as np
    from PIL import Image

    from captioning import shapes
    from captioning.modeling import (TINY, build_model, load_image_processor,
                                     train_tiny_tokenizer)

    words = [t.format(color=c, shape=s, pos=p) for t in shapes.TEMPLATES
             for c in shapes.COLORS for s in shapes.SHAPES for p in shapes.POSITIONS]
    model_dir = os.path.join(folder, "tiny")
    tokenizer = train_tiny_tokenizer(words, model_dir)
    tokenizer.save_pretrained(model_dir)
    build_model(TINY, TINY, tokenizer, (64, 64)).save_pretrained(model_dir)
    load_image_processor(TINY).save_pretrained(model_dir)
    img_dir = os.path.join(folder, "imgs")
    os.makedirs(img_dir)
    rng = np.random.default_rng(0)
    for i in range(images):
        Image.fromarray(rng.integers(0, 256, (120, 160, 3), np.uint8)).save(
            os.path.join(img_dir, f"{i:04d}.jpg"))
    base = [os.path.join(ROOT, "inference.py"), "--model_path", model_dir, "--image_path",
            img_dir, "--precision", "fp32"]
    times = []
    for cmd, env in (([sys.executable, *base], {}),
                     ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                       "--master_port", str(_free_port()), *base], {"OMP_NUM_THREADS": "1"})):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, **env})
        times.append(time.perf_counter() - start)
    return times


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8, help="images captioned at batch 8")
    p.add_argument("--images_b1", type=int, default=2, help="images captioned at batch 1")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed passes per batch size and mode, run round-robin (best of)")
    p.add_argument("--modes", nargs="+", default=["fp32", "int8"],
                   choices=["fp32", "bf16", "int8"],
                   help="precision modes, in this order; ratios are to the first. bf16 is not "
                        "a default: without native bf16 (AVX512-BF16/AMX) it is emulated, "
                        "5-10x slower than fp32, and would make most of a default run")
    p.add_argument("--ratio_images", type=int, default=48,
                   help="images for the torchrun 2-vs-1-process row (0: skip it)")
    p.add_argument("--demo", default=os.path.join(ROOT, "data", "demo"),
                   help="make demo's folder: the quality rows caption its test split in each "
                        "mode (skipped when it has no model)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in each mode's worker (0: torch's default, every "
                        "core). 1 by default: with the modes' workers and other jobs sharing "
                        "the cores, a pass's threads wait on each other (2 threads under "
                        "load ran 4-20x slower than 1), which distorts the ratios")
    p.add_argument("--model", help="a captioner folder this bench built before (its full-size "
                                   "random-weight model), instead of building one")
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode:
        return worker(args)

    from captioning.cli import configure_runtime, quiet_transformers

    configure_runtime()
    quiet_transformers()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_full_size(tmp)
        print(f"full-size ViT-B/16 + GPT-2 124M, random weights; beam 3, 16 new tokens; "
              f"batch 1: {args.images_b1} images, batch 8: {args.images} images; "
              f"best of {args.repeats}, modes round-robin; {os.cpu_count()} CPUs, load "
              f"average at start {os.getloadavg()[0]:.1f}", flush=True)
        rows = timed_rows(model, args)
        base = rows[0]
        for r in rows:
            print(f"{r['mode']:>5}: batch 1 {r['b1']:.3f} img/s ({r['b1'] / base['b1']:.2f}x "
                  f"{base['mode']}), batch 8 {r['b8']:.3f} img/s ({r['b8'] / base['b8']:.2f}x "
                  f"{base['mode']}), peak RSS {r['peak_rss_mb']:,.0f} MB, model "
                  f"{r['model_mb']:,.0f} MB, {r['threads']} threads", flush=True)
        if args.ratio_images:
            t1, t2 = torchrun_ratio(tmp, args.ratio_images)
            print(f"inference.py on {args.ratio_images} images, tiny model: 1 process "
                  f"{t1:.2f} s, torchrun 2 processes {t2:.2f} s: {t2 / t1:.2f}x the "
                  f"one-process wall time", flush=True)
    print_quality(args.demo, [m for m in args.modes if m != "fp32"], "cpu")
    print(f"bench took {time.perf_counter() - began:.0f} s")


def print_quality(demo, modes, device):
    """The quality rows: the demo model's test captions in each mode against fp32's."""
    from captioning.quantize import agreement_with_fp32

    model_dir, data_dir = os.path.join(demo, "model"), os.path.join(demo, "processed")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        print(f"quality: no demo model in {model_dir} (make demo), skipped")
        return
    for mode, (same, cider, ratio) in agreement_with_fp32(model_dir, data_dir, modes,
                                                          device).items():
        if mode == "fp32":
            continue
        print(f"quality on {device}, demo model, test split: {mode:>5} {same:6.1%} of captions "
              f"identical to fp32's, CIDEr {cider:.3f} ({ratio:.4f}x fp32's)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
