"""Training throughput on the tiny model, three setups measured side by side in one run on
the same images and captions:

- ours: train.py's setup. One uint8 row per image, normalised in CaptionCollator, labels
  padded to the longest caption in the batch, one caption sampled per image; Seq2SeqTrainer.
- earlier take: one row per caption holding float32 `pixel_values` from ViTImageProcessor,
  `padding="max_length"` to 32 with padding in the labels, `default_data_collator`;
  Seq2SeqTrainer, read back from disk as that take did (save_to_disk / load_from_disk).
- floor: the same model's forward, backward and AdamW step in a bare loop over batches
  already in memory (ours, collated in advance).

    python bench/train.py [--images 400] [--steps 60] [--batch_size 32]

Prints samples/s (one sample = one image-caption pair) for each and the ratios, over the
steps after the first 5 (set-up and first-call costs are not per-sample costs), best of
--repeats interleaved runs.
Targets: ours >= 1.5x the earlier take's samples/s, and within 1.25x of the floor's time.
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dataloader  # noqa: E402
from captioning import shapes  # noqa: E402
from captioning.cli import quiet_transformers  # noqa: E402
from captioning.modeling import (TINY_IMAGE_SIZE, build_model, load_image_processor,  # noqa: E402
                                 load_tokenizer)
from captioning.store import load_split  # noqa: E402
from captioning.trainer import CaptionCollator, TrainView  # noqa: E402


def earlier_take_dataset(ds, processor, tokenizer, path, max_length=32):
    """One row per caption, float32 pixels from the processor, padded to max_length, labels
    = the padded ids (pad = EOS, so padding counts in the loss), as the earlier take did."""
    from datasets import Dataset, load_from_disk
    from PIL import Image

    rows = {"pixel_values": [], "labels": []}
    for row in ds:
        image = Image.fromarray(row["pixel_values"].transpose(1, 2, 0))
        pixels = processor(images=image, return_tensors="np")["pixel_values"][0]
        for caption in row["captions"]:
            ids = tokenizer(caption, padding="max_length", max_length=max_length,
                            truncation=True)["input_ids"]
            rows["pixel_values"].append(pixels)
            rows["labels"].append(ids)
    Dataset.from_dict(rows).save_to_disk(path)
    return load_from_disk(path).with_format("torch")


WARMUP = 5  # steps left out of every timing: first-call allocations, Trainer set-up


def run_trainer(model, dataset, collator, args, out, ours):
    """Seconds for steps WARMUP+1 .. --steps, timed at step ends by a callback. ours: train.py's
    CaptionTrainer (token-weighted loss, counter-based caption draw); else Seq2SeqTrainer."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    from captioning.trainer import CaptionTrainer

    stamps = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    targs = Seq2SeqTrainingArguments(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=1e-3, save_strategy="no", eval_strategy="no", report_to="none",
        logging_strategy="no", disable_tqdm=True, remove_unused_columns=False,
        dataloader_pin_memory=False, use_cpu=True, seed=0)
    extra = dict(eval_collator=collator, score=None) if ours else {}
    trainer = (CaptionTrainer if ours else Seq2SeqTrainer)(
        model=model, args=targs, train_dataset=dataset, data_collator=collator,
        callbacks=[StepClock()], **extra)
    trainer.train()
    return stamps[-1] - stamps[WARMUP - 1]


def run_floor(model, batches, steps):
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(steps):
        if step == WARMUP:
            start = time.perf_counter()
        batch = batches[step % len(batches)]
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=400, help="training images")
    p.add_argument("--steps", type=int, default=60,
                   help="optimizer steps per setup (the first 5 are not timed)")
    p.add_argument("--batch_size", type=int, default=32, help="samples per step")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved runs of each setup; the best of each is reported")
    args = p.parse_args(argv)

    import torch
    from transformers import default_data_collator, set_seed

    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        coco, data = os.path.join(tmp, "coco"), os.path.join(tmp, "data")
        shapes.make_shapes_coco(coco, num_train=args.images + args.images // 10, num_val=40)
        assert dataloader.main(["--coco_dir", coco, "--save_path", data, "--encoder_model",
                                "tiny", "--decoder_model", "tiny", "--limit_data",
                                str(args.images), "--val_size", "5", "--test_size", "5",
                                "--quiet"]) == 0
        tokenizer, processor = load_tokenizer(data), load_image_processor(data)
        ours_ds = load_split(data, "train")
        earlier_ds = earlier_take_dataset(ours_ds, processor, tokenizer,
                                          os.path.join(tmp, "earlier"))

        def fresh_model():
            set_seed(0)
            return build_model("tiny", "tiny", tokenizer, (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE))

        collator = CaptionCollator(processor)
        batches = [collator([ours_ds[j] for j in range(i, min(i + args.batch_size, len(ours_ds)))])
                   for i in range(0, len(ours_ds), args.batch_size)]
        # Interleaved repeats, best of each: this machine is shared and noisy.
        t_ours, t_earlier, t_floor = [], [], []
        for _ in range(args.repeats):
            t_ours.append(run_trainer(fresh_model(), TrainView(ours_ds, 0), collator, args,
                                      os.path.join(tmp, "o"), ours=True))
            t_earlier.append(run_trainer(fresh_model(), earlier_ds, default_data_collator,
                                         args, os.path.join(tmp, "e"), ours=False))
            t_floor.append(run_floor(fresh_model(), batches, args.steps))
        t_ours, t_earlier, t_floor = min(t_ours), min(t_earlier), min(t_floor)

    samples = (args.steps - WARMUP) * args.batch_size
    print(f"tiny model, {args.images} images ({len(earlier_ds)} caption rows in the earlier "
          f"take), {args.steps - WARMUP} timed steps of {args.batch_size}, {torch.get_num_threads()} threads")
    for name, t in (("ours", t_ours), ("earlier take", t_earlier), ("floor", t_floor)):
        print(f"{name:<13} {samples / t:8.1f} samples/s  ({t:.2f} s)")
    print(f"ours / earlier take speed: {t_earlier / t_ours:.2f}x (target >= 1.5x)")
    print(f"ours time / floor time: {t_ours / t_floor:.2f}x (target <= 1.25x)")


if __name__ == "__main__":
    main()
