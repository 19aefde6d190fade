"""Evaluation wall time under torchrun: 2 processes against 1, on the same model and split.

    python bench/evaluate.py [--images 200] [--eval_batch_size 32]

The demo-sized tiny model (random weights, so captions run to full length: the worst case
for generation) captions and scores the whole test split through CaptionTrainer.caption_split,
once per process count, each with the machine's cores shared out (1 process: all threads;
2 processes: half each). Each side: one warm-up evaluation (it also starts METEOR's Java),
then the best of --repeats. Prints both times and the ratio.
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


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args):
    import torch
    from transformers import Seq2SeqTrainingArguments

    from captioning.cli import configure_runtime, quiet_transformers
    from captioning.modeling import load_image_processor, load_model_strict, load_tokenizer
    from captioning.store import load_split
    from captioning.trainer import CaptionCollator, CaptionTrainer
    from captioning.scoring import compute_caption_metrics

    configure_runtime()
    quiet_transformers()
    model = load_model_strict(args.model)
    collator = CaptionCollator(load_image_processor(args.data))
    targs = Seq2SeqTrainingArguments(
        output_dir=args.out, per_device_eval_batch_size=args.eval_batch_size, report_to="none",
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if not torch.cuda.is_available() else None)
    trainer = CaptionTrainer(model=model, args=targs, eval_collator=collator,
                             score=compute_caption_metrics,
                             processing_class=load_tokenizer(args.data))
    test = load_split(args.data, "test")
    trainer.caption_split(test, "test")  # warm-up
    best = None
    for _ in range(args.repeats):
        trainer.accelerator.wait_for_everyone()
        start = time.perf_counter()
        result = trainer.caption_split(test, "test")
        best = min(best or 1e9, time.perf_counter() - start)
    if trainer.is_world_process_zero():
        print(json.dumps({"seconds": best, "images": len(test),
                          "cider": result.metrics["test_cider"]}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200, help="test images")
    p.add_argument("--eval_batch_size", type=int, default=32, help="images per generate call")
    p.add_argument("--repeats", type=int, default=2, help="timed evaluations per side (best)")
    for hidden in ("--worker", "--data", "--model", "--out"):
        p.add_argument(hidden, help=argparse.SUPPRESS, action="store_true" if hidden ==
                       "--worker" else "store")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    import dataloader
    from captioning.modeling import build_model, load_tokenizer
    from captioning.cli import quiet_transformers
    from captioning.store import Manifest

    quiet_transformers()

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        data, model_dir = os.path.join(tmp, "data"), os.path.join(tmp, "model")
        assert dataloader.main(["--source", "shapes", "--coco_dir", os.path.join(tmp, "coco"),
                                "--shapes_train", "40", "--shapes_val", str(args.images + 40),
                                "--limit_data", "20", "--val_size", "5", "--test_size",
                                str(args.images), "--save_path", data, "--encoder_model",
                                "tiny", "--decoder_model", "tiny", "--quiet"]) == 0
        manifest = Manifest.read(data)
        build_model("tiny", "tiny", load_tokenizer(data), manifest["image_size"]
                    ).save_pretrained(model_dir)
        times = {}
        for nproc in (1, 2):
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc))}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                   str(nproc), "--master_port", str(free_port()), os.path.abspath(__file__),
                   "--worker", "--data", data, "--model", model_dir, "--out",
                   os.path.join(tmp, f"o{nproc}"), "--eval_batch_size",
                   str(args.eval_batch_size), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            times[nproc] = json.loads(out.stdout.strip().splitlines()[-1])
    n = times[1]["images"]
    print(f"{n} test images, tiny model, eval batch {args.eval_batch_size}, {cores} cores")
    for nproc, r in times.items():
        print(f"{nproc} process(es): {r['seconds']:.2f} s  ({n / r['seconds']:.1f} images/s, "
              f"CIDEr {r['cider']:.4f})")
    print(f"2-process / 1-process evaluation time: {times[2]['seconds'] / times[1]['seconds']:.2f}x")


if __name__ == "__main__":
    main()
