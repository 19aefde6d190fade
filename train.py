"""Train the ViT + GPT-2 captioner on data written by dataloader.py.

    python train.py --data_path ./processed_data --epochs 10

The encoder and decoder are the ones dataloader.py recorded in manifest.json. Every epoch
the model captions each validation image once (generation settings from
model.generation_config) and is scored against all of that image's references; the best
epoch by --metric_for_best_model is kept. At the end the test split is captioned and scored.
Written to --output_dir: the model in Hugging Face format (safetensors, config,
generation_config, tokenizer, preprocessor_config), metrics.json, test_predictions.json and
test_results_coco.json. TensorBoard logs go to runs/<run_name>/.

Training uses one caption per image per epoch, drawn at random from that image's ~5: pixels
are stored once per image, and over epochs the model sees every phrasing.
"""

import argparse
import os
import random
import shutil
import sys
import time

import numpy as np

from captioning import (FORMAT_VERSION, MANIFEST, SPLITS, HelpFormatter, build_model,
                        find_resume_checkpoint, is_complete_checkpoint, load_image_processor,
                        load_model_strict, load_split, load_tokenizer, normalize_pixels,
                        quiet_transformers, read_json, write_json)
from metrics import compute_caption_metrics


# ----------------------------------------------------------------------------- data

def read_manifest(data_path):
    """The manifest of a dataloader.py output, or ValueError with one readable line."""
    path = os.path.join(data_path, MANIFEST)
    if not os.path.isdir(data_path):
        raise ValueError(f"--data_path {data_path} does not exist; run dataloader.py first")
    if not os.path.isfile(path):
        raise ValueError(f"--data_path {data_path} has no {MANIFEST}: it was not written by "
                         f"dataloader.py (or that run did not finish)")
    try:
        manifest = read_json(path)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')!r}, this "
                         f"train.py reads {FORMAT_VERSION}; rerun dataloader.py")
    for split in SPLITS:
        if not os.path.isdir(os.path.join(data_path, split)):
            raise ValueError(f"{data_path} lacks the {split} split named in its manifest")
    return manifest


class CaptionCollator:
    """Rows of uint8 pixels and tokenised captions -> a model batch.

    Pixels are normalised here with the image processor's mean/std (what the processor
    itself would do). Labels are padded to the longest caption in the batch with -100, so
    padding never reaches the loss while the EOS that ends every caption does. GPT-2 pads
    with EOS, so masking `labels == pad_token_id` would hide that EOS too: mask by length.
    With sample_caption, each row contributes one caption chosen with Python's `random`
    (seeded by Trainer, saved in its checkpoints); otherwise the first caption.
    """

    def __init__(self, processor, sample_caption):
        self.processor = processor
        self.sample_caption = sample_caption

    def __call__(self, rows):
        import torch

        pixels = normalize_pixels(np.stack([row["pixel_values"] for row in rows]), self.processor)
        captions = [row["caption_ids"][random.randrange(len(row["caption_ids"]))
                                       if self.sample_caption else 0] for row in rows]
        labels = torch.full((len(rows), max(len(c) for c in captions)), -100, dtype=torch.long)
        for i, ids in enumerate(captions):
            labels[i, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        return {"pixel_values": pixels, "labels": labels}


class CaptionScorer:
    """compute_metrics for Seq2SeqTrainer: the i-th generated caption belongs to the i-th row
    of `references` (evaluation runs in dataset order), scored against all its captions."""

    def __init__(self, tokenizer, references):
        self.tokenizer = tokenizer
        self.references = references
        self.last_predictions = None

    def decode(self, token_ids):
        token_ids = np.where(token_ids < 0, self.tokenizer.pad_token_id, token_ids)
        texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    def __call__(self, eval_pred):
        predictions = self.decode(eval_pred.predictions)
        if len(predictions) != len(self.references):
            raise RuntimeError(f"{len(predictions)} captions for {len(self.references)} images")
        self.last_predictions = predictions
        return compute_caption_metrics(predictions, self.references)


# ----------------------------------------------------------------------------- training

def _caption_trainer_class():
    from transformers import Seq2SeqTrainer

    class CaptionTrainer(Seq2SeqTrainer):
        """Seq2SeqTrainer that (1) evaluates on each image's first caption (a steady eval loss,
        and no draw from the RNG that training's caption sampling uses), (2) loads checkpoints
        strictly, and (3) under torchrun evaluates the whole split on every process."""

        def __init__(self, *args, eval_collator, **kwargs):
            super().__init__(*args, **kwargs)
            self.eval_collator = eval_collator

        def _with_eval_collator(self, method, *args, **kwargs):
            train_collator, self.data_collator = self.data_collator, self.eval_collator
            if self.args.world_size > 1:
                self.gather_function = lambda tensor: tensor  # see _unsharded below
            try:
                return method(*args, **kwargs)
            finally:
                self.data_collator = train_collator
                self.gather_function = self.accelerator.gather_for_metrics

        # Under torchrun, Trainer 5.24's sharded evaluation handed compute_metrics 64 rows of
        # wrapped-around images per process for a 50-image split (measured), never the split
        # in order. So each process captions the whole split itself: correct, at the price of
        # repeating evaluation on every process (bound it with --max_eval_samples).
        def _unsharded(self, dataset):
            from torch.utils.data import DataLoader

            return DataLoader(dataset, batch_size=self.args.eval_batch_size, shuffle=False,
                              collate_fn=self.data_collator,
                              num_workers=self.args.dataloader_num_workers)

        def get_eval_dataloader(self, eval_dataset=None):
            if self.args.world_size > 1:
                return self._unsharded(eval_dataset if eval_dataset is not None
                                       else self.eval_dataset)
            return super().get_eval_dataloader(eval_dataset)

        def get_test_dataloader(self, test_dataset):
            if self.args.world_size > 1:
                return self._unsharded(test_dataset)
            return super().get_test_dataloader(test_dataset)

        def evaluate(self, *args, **kwargs):
            return self._with_eval_collator(super().evaluate, *args, **kwargs)

        def predict(self, *args, **kwargs):
            return self._with_eval_collator(super().predict, *args, **kwargs)

        # Trainer's own loaders restore only 73 of this model's 85 tensors in transformers
        # 5.x (the ViT keys were renamed) and merely warn; these load every tensor or fail.
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            target = self.accelerator.unwrap_model(model if model is not None else self.model)
            load_model_strict(resume_from_checkpoint, into=target)
            if self.is_world_process_zero():
                print(f"resumed weights from {resume_from_checkpoint}: all "
                      f"{len(target.state_dict())} tensors restored", file=sys.stderr)

        def _load_best_model(self):
            # Under torchrun only rank 0 writes checkpoints: wait until the last one is on
            # disk before any process reads the best (a race seen in a 2-process test run).
            self.accelerator.wait_for_everyone()
            load_model_strict(self.state.best_model_checkpoint,
                              into=self.accelerator.unwrap_model(self.model))

    return CaptionTrainer


def resolve_precision(precision):
    """auto: bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU -> (bf16, fp16)."""
    import torch

    if precision == "auto":
        if not torch.cuda.is_available():
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision in ("bf16", "fp16") and not torch.cuda.is_available():
        raise ValueError(f"--precision {precision} needs a CUDA GPU; use fp32 or auto on CPU")
    return precision == "bf16", precision == "fp16"


def freeze(model, encoder, decoder):
    """--freeze_encoder: the whole ViT. --freeze_decoder: GPT-2 except its cross-attention
    (and the layer norm before it) and the LM head, which must learn to read the image.
    GPT-2 ties the LM head to the input embeddings, so those stay trainable too."""
    if encoder:
        for p in model.encoder.parameters():
            p.requires_grad = False
    if decoder:
        for name, p in model.decoder.named_parameters():
            p.requires_grad = any(k in name for k in ("crossattention", "ln_cross_attn",
                                                       "lm_head", "wte"))


def make_training_args(args, run_dir):
    import torch
    from transformers import Seq2SeqTrainingArguments

    bf16, fp16 = resolve_precision(args.precision)
    # Evaluate where we save, so the best checkpoint can be picked among the saved ones.
    strategy = "steps" if args.save_steps else "epoch"
    return Seq2SeqTrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="linear",
        eval_strategy=strategy,
        save_strategy=strategy,
        eval_steps=args.save_steps,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        load_best_model_at_end=True,  # strictly: see CaptionTrainer._load_best_model
        metric_for_best_model=args.metric_for_best_model,
        greater_is_better=True,
        predict_with_generate=True,
        logging_steps=args.logging_steps,
        report_to="none",  # TensorBoard is attached explicitly, with our directory
        run_name=os.path.basename(run_dir),
        remove_unused_columns=False,  # the collator needs caption_ids
        bf16=bf16,
        fp16=fp16,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        activation_checkpointing=args.gradient_checkpointing,  # transformers 5 name
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        # torchrun on a CPU-only machine: gloo, since NCCL needs GPUs
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1
        and not torch.cuda.is_available() else None,
        seed=args.seed,
        disable_tqdm=args.quiet,
    )


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--data_path", default="./processed_data", help="output of dataloader.py")
    p.add_argument("--output_dir", default="./image_captioning_model",
                   help="where the model, checkpoints and metrics.json are written")
    p.add_argument("--overwrite", action="store_true",
                   help="train into a non-empty --output_dir, deleting what is there")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --output_dir "
                        "(weights, optimizer, scheduler, RNG state and data position)")
    p.add_argument("--resume_from", default=None, help="continue from this checkpoint directory")
    p.add_argument("--epochs", type=float, default=10, help="training epochs")
    p.add_argument("--max_steps", type=int, default=-1,
                   help="stop after this many optimizer steps (overrides --epochs when > 0)")
    p.add_argument("--batch_size", type=int, default=32, help="training images per step")
    p.add_argument("--eval_batch_size", type=int, default=64, help="images per generate call")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (AdamW)")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--warmup_steps", type=int, default=0,
                   help="linear warm-up steps, then linear decay to 0")
    p.add_argument("--num_beams", type=int, default=3, help="beam width for generation")
    p.add_argument("--gen_max_length", type=int, default=None,
                   help="longest generated caption in tokens (default: the manifest's "
                        "max_length)")
    p.add_argument("--metric_for_best_model", default="cider",
                   help="validation metric that picks the checkpoint kept at the end")
    p.add_argument("--max_eval_samples", type=int, default=None,
                   help="score only the first N validation images each epoch (the final "
                        "test evaluation always covers the whole test split)")
    p.add_argument("--num_preview_images", type=int, default=8,
                   help="validation images shown captioned in TensorBoard at each evaluation")
    p.add_argument("--save_steps", type=int, default=None,
                   help="checkpoint (and evaluate) every N optimizer steps (default: every epoch)")
    p.add_argument("--save_total_limit", type=int, default=2,
                   help="checkpoints kept in --output_dir (the best one is never deleted)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="optimizer step every N batches (effective batch = N x --batch_size "
                        "x processes)")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, ~30%% slower")
    p.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="processes collating batches (0: in the training process)")
    p.add_argument("--freeze_encoder", action="store_true", help="train without updating the ViT")
    p.add_argument("--freeze_decoder", action="store_true",
                   help="freeze GPT-2 except its cross-attention and LM head")
    p.add_argument("--logging_steps", type=int, default=10, help="log train loss every N steps")
    p.add_argument("--run_name", default=None,
                   help="TensorBoard run directory under runs/ (default: a timestamp)")
    p.add_argument("--runs_dir", default="runs", help="TensorBoard root directory")
    p.add_argument("--seed", type=int, default=42, help="seed for weights, sampling and order")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.num_preview_images < 0:
        p.error("--num_preview_images must be 0 or more")
    if args.resume and args.resume_from:
        p.error("give --resume or --resume_from, not both")
    if args.resume_from:
        args.resume = True
    if args.save_steps is not None and args.save_steps < 1:
        p.error("--save_steps must be at least 1")
    if args.dataloader_num_workers < 0:
        p.error("--dataloader_num_workers must be 0 or more")
    for name in ("batch_size", "eval_batch_size", "num_beams", "logging_steps",
                 "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.epochs <= 0 and args.max_steps <= 0:
        p.error("--epochs must be positive (or give --max_steps)")
    if args.lr <= 0:
        p.error("--lr must be positive")
    return args


def check_output_dir(args, is_main):
    """-> the checkpoint to resume from, or None. Nothing a user trained earlier is lost by a
    typo: a non-empty --output_dir needs --resume or --overwrite."""
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
    if non_empty:
        if not args.overwrite:
            raise ValueError(f"--output_dir {args.output_dir} is not empty; pass --resume to "
                             f"continue its training or --overwrite to replace it")
        if is_main:  # under torchrun, one process deletes
            shutil.rmtree(args.output_dir)
    return None


def tensorboard_dir(args, resume_from):
    """runs/<run_name>; a resumed run goes on writing into the directory it started."""
    if args.run_name is None and resume_from:
        previous = os.path.join(args.output_dir, "train_args.json")
        if os.path.isfile(previous):
            return read_json(previous)["tensorboard"]
    return os.path.join(args.runs_dir, args.run_name or time.strftime("%Y%m%d-%H%M%S"))


def epoch_history(log_history):
    """Trainer's log history -> one dict per validation evaluation, names without 'eval_'."""
    return [{k.removeprefix("eval_"): v for k, v in entry.items()}
            for entry in log_history if "eval_loss" in entry]


def main(argv=None):
    args = parse_args(argv)
    is_main = int(os.environ.get("RANK", "0")) == 0  # torchrun / accelerate set RANK
    try:
        manifest = read_manifest(args.data_path)
        resume_from = check_output_dir(args, is_main)
        resolve_precision(args.precision)
    except ValueError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2

    import torch
    from torch.utils.tensorboard import SummaryWriter
    from transformers import set_seed
    from reporting import CaptionPreviewCallback, OpenTensorBoardCallback, write_reports

    quiet_transformers()
    set_seed(args.seed)
    CaptionTrainer = _caption_trainer_class()
    tokenizer = load_tokenizer(args.data_path)
    processor = load_image_processor(args.data_path)
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        torch.backends.cuda.matmul.allow_tf32 = True  # Ampere and newer: TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(manifest["encoder_model"], manifest["decoder_model"], tokenizer,
                        manifest["image_size"], num_beams=args.num_beams,
                        max_length=args.gen_max_length or manifest["max_length"])
    freeze(model, args.freeze_encoder, args.freeze_decoder)
    if args.gradient_checkpointing:
        model.config.decoder.use_cache = False  # the KV cache is useless while training
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if is_main:
        print(f"model: {manifest['encoder_model']} + {manifest['decoder_model']}, "
              f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trainable, "
              f"attention: {model.encoder.config._attn_implementation}")

    train_ds = load_split(args.data_path, "train")
    val_ds = load_split(args.data_path, "validation")
    if args.max_eval_samples:
        val_ds = val_ds.select(range(min(args.max_eval_samples, len(val_ds))))
    test_ds = load_split(args.data_path, "test")

    run_dir = tensorboard_dir(args, resume_from)
    # Only the main process writes: the model, metrics, previews and TensorBoard events.
    tb_writer = SummaryWriter(run_dir) if is_main else None
    scorer = CaptionScorer(tokenizer, [list(r) for r in val_ds["captions"]])
    n_preview = min(args.num_preview_images, len(val_ds)) if is_main else 0
    previews = CaptionPreviewCallback(
        tb_writer, pixels=val_ds[:n_preview]["pixel_values"] if n_preview else [],
        references=[r[0] for r in val_ds[:n_preview]["captions"]] if n_preview else [],
        scorer=scorer)
    trainer = CaptionTrainer(
        model=model, args=make_training_args(args, run_dir),
        train_dataset=train_ds, eval_dataset=val_ds,
        data_collator=CaptionCollator(processor, sample_caption=True),
        eval_collator=CaptionCollator(processor, sample_caption=False),
        processing_class=tokenizer, compute_metrics=scorer,
        callbacks=([OpenTensorBoardCallback(tb_writer=tb_writer)] if is_main else [])
        + ([previews] if n_preview else []))
    if is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        write_json(os.path.join(args.output_dir, "train_args.json"),
                   {**vars(args), "tensorboard": run_dir})

    train_result = trainer.train(resume_from_checkpoint=resume_from)

    best = trainer.state.best_model_checkpoint
    trainer.save_model(args.output_dir)  # the best checkpoint's weights, loaded strictly
    if is_main:
        processor.save_pretrained(args.output_dir)
        print(f"best checkpoint by {args.metric_for_best_model}: {best}")

    # The final test evaluation always covers the whole test split.
    scorer.references = [list(r) for r in test_ds["captions"]]
    test = trainer.predict(test_ds, metric_key_prefix="test")
    if not trainer.is_world_process_zero():
        return 0
    test_metrics = {k.removeprefix("test_"): v for k, v in test.metrics.items()}
    for name, value in test_metrics.items():
        tb_writer.add_scalar(f"test/{name}", value, trainer.state.global_step)
    tb_writer.flush()

    predictions = [{"image_id": int(i), "file_name": f, "caption": c, "references": list(r)}
                   for i, f, c, r in zip(test_ds["image_id"], test_ds["file_name"],
                                         scorer.last_predictions, test_ds["captions"])]
    write_json(os.path.join(args.output_dir, "test_predictions.json"), predictions)
    write_json(os.path.join(args.output_dir, "test_results_coco.json"),
               [{"image_id": p["image_id"], "caption": p["caption"]} for p in predictions])
    validation = epoch_history(trainer.state.log_history)
    write_reports(args.output_dir, trainer.state.log_history, validation, test_metrics)
    write_json(os.path.join(args.output_dir, "metrics.json"), {
        "validation": validation,
        "test": test_metrics,
        "train": {**train_result.metrics, "global_step": trainer.state.global_step},
        "best_checkpoint": best, "data": manifest, "tensorboard": run_dir,
    })
    tb_writer.close()
    print("test: " + ", ".join(f"{k} {test_metrics[k]:.4f}" for k in
                               ("bleu1", "bleu4", "meteor", "rougeL", "rouge2", "cider")
                               if k in test_metrics))
    print(f"model, metrics.json and test predictions written to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
