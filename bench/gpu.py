"""Full-size training and captioning throughput on one CUDA GPU, side by side in one run.

    python bench/gpu.py                 # on a CUDA GPU: ViT-B/16 (224 px) + GPT-2 124M
    python bench/gpu.py --dry-run       # anywhere: tiny shapes, a few steps (CI runs this)

The real architectures with random weights (built from their default configs, no download),
synthetic captions of ~14 tokens. Rows:

- train.py's path: CaptionTrainer (TrainView, CaptionCollator, token-weighted loss) in bf16
- bare loop: forward, backward and AdamW on batches already on the GPU, bf16 autocast
- earlier method's settings: fp32, labels padded to 32 (padding in the loss), bare loop
- captioning: `generate` at beam 3, bf16 weights and fp32, 16 new tokens forced

Each training row: samples/s over the steps after the warm-up, MFU (FLOPs per sample
counted once with torch's FlopCounterMode, forward + backward, against --peak_tflops or the
device's dense bf16 peak looked up by name), and peak GPU memory. Same warm-up and the same
number of timed steps for every row.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Dense bf16 TFLOP/s by device name (vendor datasheets, without sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
               "RTX 4090": 165.0, "L4": 121.0}


def build(dry_run):
    from transformers import (GPT2Config, GPT2LMHeadModel, VisionEncoderDecoderModel,
                              ViTConfig, ViTModel)

    if dry_run:
        vit = ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64)
        gpt = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=500, bos_token_id=499,
                         eos_token_id=499)
    else:
        vit, gpt = ViTConfig(), GPT2Config()  # ViT-B/16 at 224 px, GPT-2 124M
    gpt.is_decoder, gpt.add_cross_attention = True, True
    model = VisionEncoderDecoderModel(encoder=ViTModel(vit), decoder=GPT2LMHeadModel(gpt))
    model.config.decoder_start_token_id = model.config.pad_token_id = gpt.eos_token_id
    model.config.eos_token_id = gpt.eos_token_id
    for name in ("decoder_start_token_id", "pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, name, gpt.eos_token_id)
    return model, vit.image_size, gpt.vocab_size, gpt.eos_token_id


def rows(n, image_size, vocab, eos, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [{"pixel_values": rng.integers(0, 256, (3, image_size, image_size), dtype=np.uint8),
             "caption_ids": [list(rng.integers(0, eos, int(rng.integers(10, 18)))) + [eos]
                             for _ in range(5)], "captions": ["x"] * 5} for _ in range(n)]


def flops_per_sample(model, batch):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["pixel_values"].shape[0]


def bare_loop(model, batches, steps, warmup, precision, device):
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5,
                                  fused=device == "cuda")
    model.train()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")
    for step in range(steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        with autocast:
            loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def trainer_path(model, data, args, precision, device, out):
    from transformers import Seq2SeqTrainingArguments, TrainerCallback

    from captioning.trainer import CaptionCollator, CaptionTrainer, TrainView
    from transformers import ViTImageProcessor

    stamps = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            sync(device)
            stamps.append(time.perf_counter())

    targs = Seq2SeqTrainingArguments(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=1e-5, save_strategy="no", eval_strategy="no", report_to="none",
        logging_strategy="no", disable_tqdm=True, remove_unused_columns=False,
        bf16=precision == "bf16", use_cpu=device == "cpu", dataloader_num_workers=0, seed=0)
    collator = CaptionCollator(ViTImageProcessor(size={"height": data[0]["pixel_values"].shape[1],
                                                       "width": data[0]["pixel_values"].shape[2]}))
    CaptionTrainer(model=model, args=targs, train_dataset=TrainView(data, 0),
                   data_collator=collator, eval_collator=collator, score=None,
                   callbacks=[StepClock()]).train()
    return stamps[-1] - stamps[args.warmup - 1]


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on any device")
    p.add_argument("--batch_size", type=int, default=64, help="training and captioning batch")
    p.add_argument("--steps", type=int, default=30, help="training steps per row")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of each timing")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's dense bf16 peak (default: looked up by name)")
    p.add_argument("--demo", default=os.path.join(ROOT, "data", "demo"),
                   help="make demo's folder: its test split captioned in bf16 against fp32 on "
                        "the GPU (skipped when it has no model)")
    args = p.parse_args(argv)

    import tempfile

    import torch

    from captioning.cli import configure_runtime, quiet_transformers
    from captioning.trainer import CaptionCollator

    configure_runtime()
    quiet_transformers()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.dry_run:
        sys.exit("bench/gpu.py: no CUDA GPU here; --dry-run runs tiny shapes on the CPU")
    if args.dry_run:
        args.batch_size, args.steps, args.warmup = min(args.batch_size, 4), 4, 1
    precision = "bf16" if device == "cuda" else "fp32"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

    def fresh_model(dtype=torch.float32):
        # A new model per row: Trainer's accelerate.prepare wraps forward in autocast for good,
        # which would turn the fp32 rows after it into bf16 ones.
        torch.manual_seed(0)
        return build(args.dry_run)[0].to(device=device, dtype=dtype)

    model, image_size, vocab, eos = build(args.dry_run)
    model.to(device)
    data = rows(max(args.batch_size * 4, 16), image_size, vocab, eos)
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": image_size, "width": image_size})
    collate = CaptionCollator(processor)
    batches = [{k: v.to(device) for k, v in collate(data[i:i + args.batch_size]).items()}
               for i in range(0, len(data), args.batch_size)]
    padded = []  # the earlier method: labels padded to 32, padding (EOS) counted in the loss
    for b in batches:
        labels = torch.full((b["labels"].shape[0], 32), eos, device=device)
        labels[:, :b["labels"].shape[1]] = b["labels"].clamp(min=0)
        padded.append({"pixel_values": b["pixel_values"], "labels": labels})
    flops = flops_per_sample(model, batches[0])

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for row, fn in (
                ("train.py path, bf16" if device == "cuda" else "train.py path",
                 lambda: trainer_path(fresh_model(), data, args, precision, device, tmp)),
                ("bare loop", lambda: bare_loop(fresh_model(), batches, args.steps,
                                                args.warmup, precision, device)),
                ("earlier: fp32, pad 32", lambda: bare_loop(fresh_model(), padded, args.steps,
                                                            args.warmup, "fp32", device))):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = fn()
            samples = (args.steps - args.warmup) * args.batch_size / seconds
            memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
            results[row] = (samples, memory)

        captions = {}
        for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            if label == "bf16" and device != "cuda":
                continue
            m = fresh_model(dtype).eval()
            pixels = batches[0]["pixel_values"].to(dtype)
            with torch.inference_mode():
                m.generate(pixel_values=pixels, num_beams=3, max_new_tokens=16, min_new_tokens=16)
                sync(device)
                start = time.perf_counter()
                for _ in range(3):
                    m.generate(pixel_values=pixels, num_beams=3, max_new_tokens=16,
                               min_new_tokens=16)
                sync(device)
            captions[label] = 3 * pixels.shape[0] / (time.perf_counter() - start)

    print(f"device: {name}; batch {args.batch_size}; {args.steps - args.warmup} timed steps "
          f"after {args.warmup}; {flops / 1e9:.1f} GFLOP per training sample (FlopCounterMode)"
          f"; peak {peak or 'unknown'} TFLOP/s")
    for row, (samples, memory) in results.items():
        mfu = f"{100 * samples * flops / (peak * 1e12):5.1f}% MFU" if peak else "  MFU n/a"
        print(f"{row:<24} {samples:9.1f} samples/s  {mfu}  peak memory {memory:6.2f} GiB")
    for label, rate in captions.items():
        print(f"captioning {label:<13} {rate:9.1f} images/s (beam 3, 16 new tokens)")
    ours, floor = results[next(iter(results))][0], results["bare loop"][0]
    print(f"train.py path / bare loop time: {floor / ours:.2f}x")
    if device == "cuda":
        from cpu import print_quality  # bench/cpu.py, beside this file

        from captioning.quantize import resolve_precision
        from captioning.devices import cuda_capability

        print_quality(args.demo, [resolve_precision("auto", "cuda", cuda_capability())[0]],
                      "cuda")


if __name__ == "__main__":
    main()
