"""Training the captioner with transformers' Seq2SeqTrainer: the data view, the collator, the
loss, evaluation, and every override of a Trainer internal, in one labelled place.

- Each image contributes one caption per epoch. Which one is a pure function of (seed, epoch,
  image index), never a draw from a shared RNG stream, so prefetching, dataloader workers
  and resuming mid-epoch cannot shift it (tests/test_training_invariants.py).
- The loss is the mean over every caption token of the effective batch: the same number
  whichever way a batch is split across accumulation steps and processes.
- Evaluation generates one caption per image, each process for its own contiguous shard;
  rank 0 puts them back in split order, scores them and shares the metrics.
"""

import dataclasses
import math

import numpy as np
from transformers import Seq2SeqTrainer

from .images import normalize_pixels
from .modeling import decode_captions, load_model_strict


# ----------------------------------------------------------------------------- data

def caption_index(seed, epoch, image_index, n_captions):
    """Which of an image's captions epoch `epoch` trains on: a counter-based draw."""
    return int(np.random.default_rng([seed, epoch, image_index]).integers(n_captions))


class EpochSampler:
    """Yields (epoch, index) keys in a permutation that is a pure function of (seed, epoch).
    Trainer (through accelerate) calls set_epoch before each epoch."""

    def __init__(self, length, seed):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return self.length

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch, 1]).permutation(self.length)
        return iter([(self.epoch, int(i)) for i in order])


def fetch_rows(dataset, indices):
    """Rows by index, in one arrow read where the dataset can (datasets.Dataset can)."""
    if hasattr(dataset, "__getitems__"):
        return dataset.__getitems__(list(indices))
    return [dataset[i] for i in indices]


class TrainView:
    """The training split as Trainer sees it: key (epoch, i) -> row i with the one caption
    that epoch trains on (see caption_index)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def _drawn(self, epoch, i, row):
        ids = row["caption_ids"]
        return {"pixel_values": row["pixel_values"],
                "caption_ids": [ids[caption_index(self.seed, epoch, i, len(ids))]]}

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        return self._drawn(epoch, int(i), self.dataset[int(i)])

    def __getitems__(self, keys):
        # One arrow read per batch, not one per row (what datasets.Dataset does too).
        keys = [key if isinstance(key, tuple) else (0, key) for key in keys]
        indices = [int(i) for _, i in keys]
        rows = fetch_rows(self.dataset, indices)
        return [self._drawn(epoch, i, row) for (epoch, _), i, row in zip(keys, indices, rows)]


class CaptionCollator:
    """Rows of uint8 pixels and tokenised captions -> a model batch, on each row's first
    caption (TrainView leaves one; evaluation scores the loss on the first reference).

    Pixels are normalised with the image processor's mean/std (what the processor itself
    would do). Labels are padded to the longest caption in the batch with -100, so padding
    never reaches the loss while the EOS that ends every caption does. GPT-2 pads with EOS,
    so masking `labels == pad_token_id` would hide that EOS too: mask by length.
    """

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, rows):
        import torch

        pixels = normalize_pixels(np.stack([row["pixel_values"] for row in rows]), self.processor)
        captions = [row["caption_ids"][0] for row in rows]
        labels = torch.full((len(rows), max(len(c) for c in captions)), -100, dtype=torch.long)
        for i, ids in enumerate(captions):
            labels[i, :len(ids)] = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        return {"pixel_values": pixels, "labels": labels}


# ----------------------------------------------------------------------------- model parts

def freeze(model, *, encoder=False, decoder=False):
    """encoder: the whole ViT. decoder: GPT-2 except its cross-attention (and the layer norm
    before it) and the LM head, which must learn to read the image; GPT-2 ties the LM head to
    the input embeddings, so those stay trainable too.

    The ViT pooler is always frozen: the decoder reads the patch states, never the pooled
    output, so the pooler would be a trainable parameter without a gradient (which DDP
    refuses once find_unused_parameters is off). It stays in the saved model."""
    for p in model.encoder.parameters():
        p.requires_grad = not encoder
    pooler = getattr(model.encoder, "pooler", None)
    if pooler is not None:
        for p in pooler.parameters():
            p.requires_grad = False
    for name, p in model.decoder.named_parameters():
        p.requires_grad = not decoder or any(
            k in name for k in ("crossattention", "ln_cross_attn", "lm_head", "wte"))


def upcast_decoder_attention(model):
    """fp16 and GPT-2: attention scores overflow in half precision. transformers applies
    GPT-2's `reorder_and_upcast_attn` only on the eager attention path, so take that path."""
    model.decoder.config.reorder_and_upcast_attn = True
    for module in model.decoder.modules():
        if hasattr(module, "reorder_and_upcast_attn"):
            module.reorder_and_upcast_attn = True
    model.decoder.set_attn_implementation("eager")


def token_loss_sum(model, batch, config):
    """-> (sum of per-token cross-entropy over the batch's caption tokens, token count).
    `model` may be wrapped (DDP, compile); `config` is the VisionEncoderDecoderConfig."""
    import torch.nn.functional as F
    from transformers.models.vision_encoder_decoder.modeling_vision_encoder_decoder import \
        shift_tokens_right

    labels = batch["labels"]
    decoder_input_ids = shift_tokens_right(labels, config.pad_token_id,
                                           config.decoder_start_token_id)
    logits = model(pixel_values=batch["pixel_values"], decoder_input_ids=decoder_input_ids,
                   use_cache=False).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def shard_range(n, rank, world):
    """Contiguous [start, end) of n items for process `rank` of `world`: every item exactly
    once, in order when the shards are concatenated by rank."""
    per = -(-n // world)
    return min(n, rank * per), min(n, (rank + 1) * per)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; no optimizer step was taken with it."""


@dataclasses.dataclass
class CaptionResult:
    """One captioned split. predictions (split order) on the main process, None elsewhere;
    metrics (prefixed) on every process."""

    predictions: list | None
    metrics: dict


# ----------------------------------------------------------------------------- the trainer

class CaptionTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer for the captioner.

    Arguments beyond Seq2SeqTrainer's: `eval_collator` (rows -> batch for evaluation),
    `score` (predictions, references -> metrics dict), `on_predictions(prefix, predictions,
    global_step)` (called on the main process after each evaluation, with the captions in
    split order: previews, reports), and `caption_seed` (the caption draw, see TrainView).
    """

    # The loss returned by compute_loss is already normalised by the effective batch's token
    # count, so training_step must not divide it by the accumulation steps again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, eval_collator, score, on_predictions=None, caption_seed=0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator
        self.score = score
        self.on_predictions = on_predictions
        self.caption_seed = caption_seed

    # ------------------------------------------------------------------ evaluation (ours)

    def caption_split(self, dataset, prefix):
        """Caption every image of `dataset` once and score the captions against all their
        references. Under a launcher each process takes its own contiguous shard."""
        import torch

        import time

        began = time.perf_counter()
        world, rank = self.args.world_size, self.args.process_index
        start, end = shard_range(len(dataset), rank, world)
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        loss_sum, tokens, captions = 0.0, 0, []
        batch_size = self.args.per_device_eval_batch_size
        for first in range(start, end, batch_size):
            rows = fetch_rows(dataset, range(first, min(first + batch_size, end)))
            batch = {k: v.to(self.args.device) for k, v in self.eval_collator(rows).items()}
            with torch.no_grad(), self.autocast_smart_context_manager():
                batch_loss, batch_tokens = token_loss_sum(model, batch, model.config)
                generated = model.generate(pixel_values=batch["pixel_values"])
            loss_sum += float(batch_loss)
            tokens += batch_tokens
            captions += decode_captions(generated, self.processing_class)
        shards = [(captions, loss_sum, tokens)]
        if world > 1:
            shards = [None] * world
            torch.distributed.all_gather_object(shards, (captions, loss_sum, tokens))
        metrics, predictions = None, None
        if self.is_world_process_zero():
            predictions = [c for shard, _, _ in shards for c in shard]
            if len(predictions) != len(dataset):
                raise RuntimeError(f"{len(predictions)} captions for {len(dataset)} images")
            metrics = self.score(predictions, [list(r) for r in dataset["captions"]])
            metrics["loss"] = sum(s[1] for s in shards) / max(1, sum(s[2] for s in shards))
            metrics["runtime"] = time.perf_counter() - began
            metrics = {f"{prefix}_{k}": float(v) for k, v in metrics.items()}
        if world > 1:
            shared = [metrics]
            torch.distributed.broadcast_object_list(shared, src=0)
            metrics = shared[0]
        return CaptionResult(predictions, metrics)

    # ------------------------------------------------------------------ Trainer overrides
    # Each replaces a Trainer method of transformers 5.24 whose own behaviour is wrong for
    # this model; the test named beside it fails if the override stops taking effect.

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval", **_):
        # Trainer 5.24's sharded evaluation pads the last shard by wrapping around (images
        # scored twice) and hands compute_metrics unordered rows. Guarded by
        # tests/test_training_invariants.py::test_torchrun_evaluation_equals_one_process.
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        result = self.caption_split(dataset, metric_key_prefix)
        if self.on_predictions is not None and result.predictions is not None:
            self.on_predictions(metric_key_prefix, result.predictions, self.state.global_step)
        self.log(result.metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control,
                                                         result.metrics)
        return result.metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # VisionEncoderDecoderModel.forward takes **kwargs, so Trainer believes the model
        # divides by num_items_in_batch, and skips its own division; the model ignores it and
        # returns a per-micro-batch mean, which made the loss N x W too large. Here: token
        # sum / tokens of the whole effective batch (all accumulation steps, all processes),
        # times W because DDP averages gradients over processes. Guarded by
        # tests/test_training_invariants.py::test_loss_invariant_to_batch_split.
        loss_sum, tokens = token_loss_sum(model, inputs,
                                         self.accelerator.unwrap_model(model).config)
        count = num_items_in_batch if num_items_in_batch is not None else max(tokens, 1)
        loss = loss_sum / count * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Stop at the first non-finite loss, before its gradient reaches the weights, so the
        # last checkpoint written is a good one. Guarded by test_non_finite_loss_stops_the_run.
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not math.isfinite(float(loss)):
            raise NonFiniteLossError(
                f"the training loss became {float(loss)} at step {self.state.global_step + 1}; "
                f"the last checkpoint is intact. Try a lower --lr, --precision bf16 or fp32")
        return loss

    def _get_train_sampler(self, train_dataset=None):
        # Trainer's RandomSampler plus a collate-time caption draw from Python's RNG made
        # resume inexact (accelerate collates one batch ahead of the saved RNG state).
        # Guarded by tests/test_training_invariants.py::test_resume_mid_epoch_is_exact.
        dataset = self.train_dataset if train_dataset is None else train_dataset
        return EpochSampler(len(dataset), self.args.seed)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Trainer's own loader restores only some of this model's tensors in transformers 5.x
        # (the ViT keys were renamed) and merely warns; this loads every tensor or fails.
        # Guarded by tests/test_checkpoints.py::test_strict_resume_restores_every_tensor.
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_model_strict(resume_from_checkpoint, into=target)
        if self.is_world_process_zero():
            import sys

            print(f"resumed weights from {resume_from_checkpoint}: all "
                  f"{len(target.state_dict())} tensors restored", file=sys.stderr)

    def _load_best_model(self):
        # The same strict load for the best checkpoint. Under torchrun only rank 0 writes
        # checkpoints: wait until the last one is on disk before any process reads it.
        # Guarded by tests/test_train.py::test_final_model_is_the_best_checkpoint.
        self.accelerator.wait_for_everyone()
        load_model_strict(self.state.best_model_checkpoint,
                          into=self.accelerator.unwrap_model(self.model))
