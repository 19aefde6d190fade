"""Captioning on the CPU in each --precision mode, side by side in one run, and inference.py
under torchrun with 2 processes against 1.

    python bench/cpu.py [--images 8] [--images_b1 2] [--repeats 1] [--modes fp32 bf16 int8]
                        [--demo data/demo]

The full-size architecture (ViT-B/16 at 224 px + GPT-2 124M with 50,257 tokens) in local
folders shaped like the Hub's, random weights (no network here), joined and saved the way
train.py saves a model, then loaded through inference.py's path (captioner.load_captioner,
caption_pixels). Each mode runs in its own process (so that its peak RSS is its own) and does
the same work: one warm-up generate (1 image, 2 tokens), then the best of --repeats passes
over --images_b1 images at batch 1 and over --images images at batch 8, beam 3, exactly 16
new tokens (min_new_tokens = max_new_tokens, so no mode stops early). Reports images/s, the
ratio to fp32, peak RSS and the model's size in memory.

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
    """One mode: -> one JSON line."""
    import resource

    import numpy as np
    import torch

    from captioning.captioner import caption_pixels, load_captioner
    from captioning.quantize import model_bytes

    model, tokenizer, processor = load_captioner(args.model, "cpu", args.mode)
    size = model_bytes(model)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (max(args.images, args.images_b1), 3, 224, 224), np.uint8)
    caption_pixels(pixels[:1], model, tokenizer, processor, num_beams=3, min_new_tokens=2,
                   max_new_tokens=2)  # warm-up: first-call allocations, quantized kernels
    result = {"mode": args.mode, "threads": torch.get_num_threads(), "model_mb": size / 2**20}
    for batch, count in ((1, args.images_b1), (8, args.images)):
        best = None
        for _ in range(args.repeats):
            start = time.perf_counter()
            for first in range(0, count, batch):
                caption_pixels(pixels[first:first + batch], model, tokenizer, processor,
                               **GENERATE)
            best = min(best or 1e9, time.perf_counter() - start)
        result[f"b{batch}"] = count / best
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result), flush=True)


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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8, help="images captioned at batch 8")
    p.add_argument("--images_b1", type=int, default=2, help="images captioned at batch 1")
    p.add_argument("--repeats", type=int, default=1, help="timed passes per batch size (best)")
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16", "int8"],
                   choices=["fp32", "bf16", "int8"], help="precision modes, in this order")
    p.add_argument("--ratio_images", type=int, default=48,
                   help="images for the torchrun 2-vs-1-process row (0: skip it)")
    p.add_argument("--demo", default=os.path.join(ROOT, "data", "demo"),
                   help="make demo's folder: the quality rows caption its test split in each "
                        "mode (skipped when it has no model)")
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode:
        return worker(args)

    from captioning.cli import configure_runtime, quiet_transformers

    configure_runtime()
    quiet_transformers()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_full_size(tmp)
        print(f"full-size ViT-B/16 + GPT-2 124M, random weights; beam 3, 16 new tokens; "
              f"batch 1: {args.images_b1} images, batch 8: {args.images} images; "
              f"best of {args.repeats}", flush=True)
        rows = []
        for mode in args.modes:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--mode", mode,
                                  "--model", model, "--images", str(args.images),
                                  "--images_b1", str(args.images_b1),
                                  "--repeats", str(args.repeats)],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            base = rows[0]
            print(f"{mode:>5}: batch 1 {r['b1']:.3f} img/s ({r['b1'] / base['b1']:.2f}x fp32), "
                  f"batch 8 {r['b8']:.3f} img/s ({r['b8'] / base['b8']:.2f}x fp32), "
                  f"peak RSS {r['peak_rss_mb']:,.0f} MB, model {r['model_mb']:,.0f} MB, "
                  f"{r['threads']} threads", flush=True)
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
