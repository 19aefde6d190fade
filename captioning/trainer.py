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
import sys
import time

import numpy as np
from transformers import Seq2SeqTrainer

from .devices import shard_range
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


# ----------------------------------------------------------------------------- loss and shards

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
    `score` (predictions, references -> metrics dict), and `on_predictions(prefix,
    predictions, global_step)` (called on the main process after each evaluation, with the
    captions in split order: previews, reports).
    """

    def __init__(self, *args, eval_collator, score, on_predictions=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator
        self.score = score
        self.on_predictions = on_predictions
        self._epoch_sampler = None
        # Trainer settings (not method overrides) that compute_loss relies on, transformers
        # 5.24: count the effective batch's tokens (num_items_in_batch) whatever the model's
        # forward signature says, and don't divide the loss by the accumulation steps again.
        # Guarded by tests/test_training_invariants.py::test_loss_invariant_to_batch_split.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

    # ------------------------------------------------------------------ evaluation (ours)

    def caption_split(self, dataset, prefix):
        """Caption every image of `dataset` once and score the captions against all their
        references. Under a launcher each process takes its own contiguous shard."""
        import torch

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
        if not math.isfinite(metrics[f"{prefix}_loss"]):
            raise NonFiniteLossError(
                f"the {prefix} loss became {metrics[f'{prefix}_loss']} at step "
                f"{self.state.global_step}, so the weights are broken; no checkpoint was written "
                f"for them and the earlier ones are intact. Try a lower --lr, --precision bf16 "
                f"or fp32")
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

    def _get_grad_norm(self, model, grad_norm=None):
        # Stop at the first non-finite gradient (a NaN or infinite loss gives one), before the
        # optimizer step, so no checkpoint ever holds its weights. The norm is taken after
        # DDP's all-reduce, so every process stops at the same step. Under fp16 the
        # GradScaler skips overflowing steps itself, so the check is left to it.
        # Guarded by tests/test_training_invariants.py::test_non_finite_loss_stops_the_run.
        grad_norm = super()._get_grad_norm(model, grad_norm)
        value = float(grad_norm) if grad_norm is not None else 0.0
        if not math.isfinite(value) and not self.args.fp16:
            raise NonFiniteLossError(
                f"the training loss or its gradient became {value} at step "
                f"{self.state.global_step + 1}; that step was not taken and the last checkpoint "
                f"is intact. Try a lower --lr, --precision bf16 or fp32")
        return grad_norm

    def _run_epoch(self, *args, epoch, **kwargs):
        # accelerate's set_epoch does not reach the sampler through the wrappers that
        # skip_first_batches and BatchSamplerShard add under torchrun, so a resumed epoch would
        # replay epoch 0's order and captions. Guarded by
        # tests/test_training_invariants.py::test_resume_mid_epoch_is_exact[0-2].
        if self._epoch_sampler is not None:
            self._epoch_sampler.set_epoch(epoch)
        return super()._run_epoch(*args, epoch=epoch, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        # Trainer's RandomSampler plus a collate-time caption draw from Python's RNG made
        # resume inexact (accelerate collates one batch ahead of the saved RNG state).
        # Guarded by tests/test_training_invariants.py::test_resume_mid_epoch_is_exact.
        dataset = self.train_dataset if train_dataset is None else train_dataset
        self._epoch_sampler = EpochSampler(len(dataset), self.args.seed)
        return self._epoch_sampler

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Trainer's own loader restores only some of this model's tensors in transformers 5.x
        # (the ViT keys were renamed) and merely warns; this loads every tensor or fails.
        # Guarded by tests/test_resume.py::test_strict_resume_restores_every_tensor.
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_model_strict(resume_from_checkpoint, into=target)
        if self.is_world_process_zero():
            print(f"resumed weights from {resume_from_checkpoint}: all "
                  f"{len(target.state_dict())} tensors restored", file=sys.stderr)

    def _load_best_model(self):
        # The same strict load for the best checkpoint. Under torchrun only rank 0 writes
        # checkpoints: wait until the last one is on disk before any process reads it.
        # Guarded by tests/test_model.py::test_best_model_load_restores_every_tensor_of_the_
        # best_checkpoint.
        self.accelerator.wait_for_everyone()
        load_model_strict(self.state.best_model_checkpoint,
                          into=self.accelerator.unwrap_model(self.model))
