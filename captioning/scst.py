"""Self-critical sequence training (SCST, Rennie et al. 2017): after cross-entropy, optimise
CIDEr-D itself. `train.py --scst --init_from DIR` trains with `SCSTTrainer`.

Per image and step: draw K captions by multinomial sampling; each one's reward is its
CIDEr-D against that image's references; the loss is -(reward - baseline) * log p(caption),
summed over the sampled tokens and divided by the sampled-token count of the effective batch
(all accumulation steps, all processes), like the cross-entropy loss.

- Baseline: the mean reward of the image's *other* K-1 samples (Luo 2020, the default), or
  the greedy caption's reward (`--scst_baseline greedy`).
- EOS is part of a sampled caption: its reward text ends with the word EOS_WORD when the
  caption ended, and every reference's does. An unfinished caption (no EOS within
  max_new_tokens) lacks the n-grams that end a reference and scores lower than the same
  words finished (tested).
- Memory: the encoder runs once per image with gradients; sampling and the greedy baseline
  read that encoding detached, under inference_mode; the one forward pass with gradients is the
  decoder over the K samples, reading the same encoding (captioning/sampling.py: once per
  distinct prefix of an image's samples).
- Rewards use pycocoevalcap's PTB rules in Python (scoring.ptb_tokenize without Java: no
  Java start per step) and CiderD with the training references' document frequencies.
"""

import numpy as np

from .cider import CiderD, load_or_count
from .modeling import decode_captions, through_first_eos
from .sampling import generate_from_encoding, sample_log_probs
from .scoring import ptb_tokenize
from .trainer import CaptionCollator, CaptionTrainer, TrainView

EOS_WORD = "<eos>"  # added after PTB tokenisation, which could never produce it
TOKENIZER_NAME = "ptb-python+eos-v1"
LOG_KEYS = ("reward", "baseline", "sample_length", "eos_share")


# ----------------------------------------------------------------------------- rewards

def reward_texts(captions, finished):
    """Caption texts -> the token strings CIDEr-D scores: PTB-tokenised (Python rules),
    with EOS_WORD appended to those that ended with EOS."""
    tokens = ptb_tokenize(list(captions), use_java=False)
    return [f"{t} {EOS_WORD}".strip() if done else t for t, done in zip(tokens, finished)]


def _reference_tokens(references):
    return reward_texts(references, [True] * len(references))


class CiderReward:
    """CIDEr-D of sampled captions against the training references. Document frequencies
    and tokenised references: from the cache in `cache_dirs` (or counted and cached there).
    Each image's reference vectors: built on its first use, then kept."""

    def __init__(self, reference_sets, cache_dirs, write_cache=True):
        self.tokens, df = load_or_count(reference_sets, _reference_tokens, TOKENIZER_NAME,
                                        cache_dirs, write=write_cache)
        self.cider = CiderD(df, len(self.tokens))
        self.tables = {}

    def table(self, image):
        table = self.tables.get(image)
        if table is None:
            table = self.tables[image] = self.cider.reference_table(self.tokens[image])
        return table

    def __call__(self, captions, finished, images):
        """-> float64 array of rewards; captions[i] belongs to training image images[i]."""
        texts = reward_texts(captions, finished)
        seen, out = {}, np.empty(len(texts))
        for i, (text, image) in enumerate(zip(texts, images)):
            key = (text, image)  # samples of one image often repeat: score each once
            if key not in seen:
                seen[key] = self.cider.score(text, self.table(image))
            out[i] = seen[key]
        return out


def baselines(rewards, k, kind, greedy_rewards=None):
    """rewards (B*K,), grouped by image -> each sample's baseline (B*K,)."""
    if kind == "greedy":
        return np.repeat(greedy_rewards, k)
    per_image = rewards.reshape(-1, k)
    others = (per_image.sum(axis=1, keepdims=True) - per_image) / (k - 1)
    return others.reshape(-1)


def policy_loss_sum(log_probs, mask, advantage):
    """-> sum over sampled tokens of -(reward - baseline) * log p(token)."""
    return -(advantage.unsqueeze(1) * log_probs * mask).sum()


# ----------------------------------------------------------------------------- data and trainer

class SCSTView(TrainView):
    """TrainView whose rows also carry the image's index in the training split, to find its
    references."""

    def _drawn(self, epoch, i, row):
        return {**super()._drawn(epoch, i, row), "image_index": i}


class SCSTCollator(CaptionCollator):
    def __call__(self, rows):
        import torch

        batch = super().__call__(rows)
        batch["image_index"] = torch.tensor([row["image_index"] for row in rows])
        return batch


class SCSTTrainer(CaptionTrainer):
    """CaptionTrainer with the self-critical loss. Extra arguments: `reward` (CiderReward),
    `samples` (K), `baseline` ("mean" or "greedy").

    The loss divides by the sampled tokens of the whole effective batch, which are known
    only after the last micro-batch has sampled. So each micro-batch backpropagates its
    token sum over a fixed provisional divisor, and `_finish_gradients` rescales the
    gradients once, before clipping, by (provisional divisor x processes / global tokens).
    The logged loss and the SCST statistics are the exact global ones."""

    def __init__(self, *args, reward, samples, baseline, **kwargs):
        super().__init__(*args, **kwargs)
        self.reward, self.samples, self.baseline = reward, samples, baseline
        self._divisor = float(self.args.per_device_train_batch_size * samples)
        # This process's sums over the current step's micro-batches: sampled tokens, loss
        # sum, reward, baseline, finished samples, samples.
        self._step = np.zeros(6)
        # Global per-step means summed since the last log: loss, reward, baseline, sample
        # length, EOS share, and the number of steps.
        self._logged = np.zeros(6)
        self._session = [0.0, 0]  # loss sum and steps of this session, for train_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import torch

        unwrapped = self.accelerator.unwrap_model(model)
        k, eos = self.samples, unwrapped.config.eos_token_id
        # accelerate's mixed precision (autocast) normally rides on the wrapped model's
        # forward; the encoder, sampling and the scoring pass below call other functions,
        # so it is applied here, to all three alike (on a CPU in fp32 it is a no-op).
        with self.accelerator.autocast():
            # The one encoder pass, with gradients; sampling and the scoring pass reuse it.
            states = unwrapped.encoder(pixel_values=inputs["pixel_values"]).last_hidden_state
            ids = generate_from_encoding(unwrapped, states.detach(), k, sample=True)
            greedy = (generate_from_encoding(unwrapped, states.detach(), 1, sample=False)
                      if self.baseline == "greedy" else None)
        mask, finished = through_first_eos(ids, eos)
        images = np.repeat(inputs["image_index"].cpu().numpy(), k)
        rewards = self.reward(decode_captions(ids, self.processing_class),
                              finished.cpu().tolist(), images)
        greedy_rewards = None
        if greedy is not None:
            greedy_finished = through_first_eos(greedy, eos)[1]
            greedy_rewards = self.reward(decode_captions(greedy, self.processing_class),
                                         greedy_finished.cpu().tolist(), images[::k])
        base = baselines(rewards, k, self.baseline, greedy_rewards)
        advantage = torch.as_tensor(rewards - base, dtype=torch.float32, device=ids.device)
        # Score the policy that sampled: the decoder without dropout, as sampling ran it
        # (eval mode stops dropout, not gradients). The encoding is the one sampled from.
        model.eval()
        try:
            with self.accelerator.autocast():
                log_probs = sample_log_probs(model, unwrapped, states, ids, k, mask)
        finally:
            model.train()
        loss_sum = policy_loss_sum(log_probs, mask.float(), advantage)
        self._step += [float(mask.sum()), float(loss_sum.detach()), rewards.sum(), base.sum(),
                       float(finished.sum()), len(rewards)]
        loss = loss_sum / self._divisor
        return (loss, None) if return_outputs else loss

    def _finish_gradients(self, model):
        """Once per optimizer step, before the norm is taken: gradients from provisional to
        exact scale; the step's statistics summed over processes."""
        import torch

        if not self._step[5]:
            return  # already done for this step
        sums = torch.tensor(self._step, dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1:
            torch.distributed.all_reduce(sums)
        tokens, loss_sum, reward, base, finished, samples = sums.cpu().tolist()
        scale = self._divisor * self.accelerator.num_processes / max(tokens, 1.0)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        loss = loss_sum / max(tokens, 1.0)
        self._logged += [loss, reward / samples, base / samples, tokens / samples,
                         finished / samples, 1]
        self._session[0] += loss
        self._session[1] += 1
        self._step[:] = 0

    def _clip_grad_norm(self, model):
        self._finish_gradients(model)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        self._finish_gradients(model)  # a no-op when clipping already did it
        return super()._get_grad_norm(model, grad_norm)

    def log(self, logs, start_time=None):
        # Trainer's "loss" sums the provisional micro-batch values: replace it with the exact
        # per-token loss, averaged over the steps since the last log, and add the SCST
        # statistics (TensorBoard shows them as train/scst_*).
        if "loss" in logs and self._logged[5]:
            means = self._logged[:5] / self._logged[5]
            logs["loss"] = float(means[0])
            logs.update({f"scst_{key}": float(v) for key, v in zip(LOG_KEYS, means[1:])})
            self._logged[:] = 0
        if "train_loss" in logs and self._session[1]:
            logs["train_loss"] = self._session[0] / self._session[1]
        super().log(logs, start_time)


def make_reward(train_split, data_path, output_dir, is_main):
    """CiderReward over the training split's references, cached in the data folder (or
    the output folder where the data is read-only)."""
    return CiderReward([list(r) for r in train_split["captions"]], [data_path, output_dir],
                       write_cache=is_main)

