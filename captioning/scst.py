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
  read that encoding detached, under no_grad; the one forward pass with gradients is the
  decoder over the K samples, reading the same encoding expanded K times.
- Rewards use pycocoevalcap's PTB rules in Python (scoring.ptb_tokenize without Java: no
  Java start per step) and CiderD with the training references' document frequencies.
"""

import numpy as np

from .cider import CiderD, load_or_count
from .modeling import decode_captions, through_first_eos
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


# ----------------------------------------------------------------------------- the model side

def _lean_gpt2(decoder):
    """The GPT-2 modules the lean loop runs by hand, or None when the decoder is something
    else (then the loop calls the decoder's own forward with its cache)."""
    from transformers import GPT2LMHeadModel

    if not isinstance(decoder, GPT2LMHeadModel) or not decoder.config.add_cross_attention:
        return None
    if getattr(decoder.config, "reorder_and_upcast_attn", False):
        # fp16 training upcasts GPT-2's attention (train.py, upcast_decoder_attention), which
        # _GPT2Step does not; the decoder's own forward keeps it, so samples and the scoring
        # pass come from the same function.
        return None
    return decoder.transformer


class _GPT2Step:
    """One decoding step of a GPT-2 decoder with cross-attention, written out: the same
    modules and weights as GPT2LMHeadModel's forward at one new token per row with its
    KV cache, without its per-call machinery (masks, cache objects, argument handling,
    dropout calls). Self-attention keys/values go into buffers of max_new rows; the
    cross-attention keys/values are projected once, per image, and repeated over its k
    samples. Only for eval mode (no dropout) and no attention masks (a caption attends to
    all of its own tokens and all patches), which is how sampling runs."""

    def __init__(self, lm, encoded, k, max_new):
        import torch

        self.lm, self.t = lm, lm.transformer
        self.rows, self.max_new = encoded.shape[0] * k, max_new
        self.cross, self.self_kv = [], [None] * len(self.t.h)
        for block in self.t.h:
            attn = block.crossattention
            key, value = attn.c_attn(encoded).split(attn.split_size, dim=2)
            shape = (*key.shape[:-1], -1, attn.head_dim)
            key, value = (x.view(shape).transpose(1, 2) for x in (key, value))
            if k > 1:
                key, value = key.repeat_interleave(k, dim=0), value.repeat_interleave(k, dim=0)
            self.cross.append((key.transpose(-1, -2), value))  # keys ready for q @ k
        self.torch = torch
        act = lm.config.activation_function
        self.act = ((lambda x: torch.nn.functional.gelu(x, approximate="tanh"))
                    if act in ("gelu_new", "gelu_pytorch_tanh") else None)

    @staticmethod
    def _attend(q, keys_t, values, scale):
        # q (N, heads, 1, d) against at most a few dozen keys: a plain softmax(q k^T) v is
        # cheaper on a CPU than scaled_dot_product_attention's dispatch.
        return (q @ keys_t).mul_(scale).softmax(dim=-1) @ values

    def keep(self, index):
        """Go on with these rows only."""
        self.cross = [(key[index], value[index]) for key, value in self.cross]
        self.self_kv = [None if kv is None else (kv[0][index], kv[1][index])
                        for kv in self.self_kv]

    def __call__(self, tokens, position):
        """tokens (N,) at `position` -> logits (N, V) for the next token."""
        n = tokens.shape[0]
        h = (self.t.wte(tokens) + self.t.wpe.weight[position])[:, None, :]
        for i, block in enumerate(self.t.h):
            attn = block.attn
            q, key, value = attn.c_attn(block.ln_1(h)).split(attn.split_size, dim=2)
            q, key, value = (x.view(n, 1, -1, attn.head_dim).transpose(1, 2)
                             for x in (q, key, value))
            if self.self_kv[i] is None:  # keys stored transposed: (N, heads, d, max_new)
                shape = (n, key.shape[1], attn.head_dim, self.max_new)
                self.self_kv[i] = (key.new_empty(shape),
                                   value.new_empty((*shape[:2], self.max_new, attn.head_dim)))
            keys_t, values = self.self_kv[i]
            keys_t[:, :, :, position] = key[:, :, 0]
            values[:, :, position] = value[:, :, 0]
            out = self._attend(q, keys_t[..., :position + 1], values[:, :, :position + 1],
                               attn.scaling)
            h = h + attn.c_proj(out.transpose(1, 2).reshape(n, 1, -1))
            cross = block.crossattention
            q = cross.q_attn(block.ln_cross_attn(h)).view(n, 1, -1, cross.head_dim).transpose(1, 2)
            out = self._attend(q, *self.cross[i], cross.scaling)
            h = h + cross.c_proj(out.transpose(1, 2).reshape(n, 1, -1))
            mlp = block.mlp
            inner = mlp.c_fc(block.ln_2(h))
            h = h + mlp.c_proj(self.act(inner) if self.act else mlp.act(inner))
        return self.lm.lm_head(self.t.ln_f(h))[:, 0]


def draw(probs, u):
    """One token per row of `probs` (N, V) by inverting its cumulative distribution at the
    uniform numbers `u` (N, 1) in [0, 1): token i when cdf[i-1] <= u * total < cdf[i], so
    token i with probability probs[i] and never a zero-probability token. The same
    distribution as torch.multinomial(probs, 1), which at 80 rows x 350 tokens took about
    19x as long on this project's CPU machine (6.8 ms vs 0.36 ms each, under load). The sum
    runs in float64: in float32 over GPT-2's 50,257 tokens each token's mass is rounded to
    the grid near the running total (~6e-8), which leaves some tail tokens undrawable (MPS
    has no float64 and keeps float32)."""
    import torch

    cdf = probs.to(_draw_dtype(probs.device)).cumsum(-1)
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    return picked.clamp_(max=probs.shape[-1] - 1)


def _draw_dtype(device):
    import torch

    return torch.float32 if torch.device(device).type == "mps" else torch.float64


class _DecoderStep:
    """One decoding step through the decoder's own forward with its cache (any decoder
    with cross-attention; slower per step than _GPT2Step)."""

    def __init__(self, decoder, encoded, k):
        self.decoder, self.cache = decoder, None
        self.encoded = encoded.repeat_interleave(k, dim=0) if k > 1 else encoded

    def keep(self, index):
        self.encoded = self.encoded[index]
        self.cache.reorder_cache(index)

    def __call__(self, tokens, position):
        out = self.decoder(input_ids=tokens[:, None], encoder_hidden_states=self.encoded,
                           cache=self.cache, use_cache=True)
        self.cache = out.cache if hasattr(out, "cache") else out.past_key_values
        return out.logits[:, -1]


def generate_from_encoding(model, states, k, sample, return_log_probs=False, lean=True,
                           uniforms=None):
    """Captions from an encoding, under no_grad and in eval mode (no dropout): k samples per
    image from the model's own distribution (`draw` from the softmax of the last logits:
    temperature 1, no top-k/top-p cut, no penalties), or with `sample=False` one
    greedy (argmax) caption per image. A plain loop over the decoder and its KV cache, the
    decoder reading `states` (B, P, H): each row stops at its first EOS and is padded with
    the pad id after it; the loop ends when every row has ended, or after the model's
    max_new_tokens. Of the generation config only max_new_tokens is read, so penalties or
    other processors saved with the init model never reach sampling. With `lean` (the
    default) a GPT-2 decoder runs through _GPT2Step; otherwise through its own forward.

    `uniforms` (B*k, max_new), for tests: the uniform numbers `draw` uses at each step,
    instead of torch.rand's.

    -> ids (B*k, T) without the start token; with `return_log_probs` also the float32
    log-softmax of each step's logits (B*k, T, V), what each token was drawn from."""
    import torch

    config, generation = model.config, model.generation_config
    eos = config.eos_token_id if config.eos_token_id is not None else generation.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=states.device)
    pad = config.pad_token_id if config.pad_token_id is not None else int(eos[0])
    max_new = generation.max_new_tokens or generation.max_length - 1
    was_training = model.training
    model.eval()  # sample the policy that evaluation uses (no dropout)
    try:
        with torch.no_grad():
            encoded = states
            if getattr(model, "enc_to_dec_proj", None) is not None:
                encoded = model.enc_to_dec_proj(encoded)  # as VisionEncoderDecoderModel does
            if lean and _lean_gpt2(model.decoder) is not None:
                step = _GPT2Step(model.decoder, encoded, k, max_new)
            else:
                step = _DecoderStep(model.decoder, encoded, k)
            rows = states.shape[0] * k
            device = states.device
            ids = torch.full((rows, max_new), pad, dtype=torch.long, device=device)
            log_probs = None
            # The rows still running: once an eighth of them have produced EOS, those leave
            # the batch (their caches with them), so finished captions cost little.
            active = torch.arange(rows, device=device)
            finished = torch.zeros(rows, dtype=torch.bool, device=device)  # of `active`
            tokens = torch.full((rows,), config.decoder_start_token_id, dtype=torch.long,
                                device=device)
            length = 0
            for position in range(max_new):
                logits = step(tokens, position).float()
                if sample:
                    # float64 uniforms (as draw's sum): float32's 2**-24 grid would round
                    # every token's chance to a multiple of 6e-8
                    u = (torch.rand(len(active), 1, device=device, dtype=_draw_dtype(device))
                         if uniforms is None else uniforms[active, position, None])
                    tokens = draw(torch.softmax(logits, dim=-1), u)
                else:
                    tokens = logits.argmax(dim=-1)
                tokens = tokens.masked_fill(finished, pad)
                ids[active, position] = tokens
                if return_log_probs:
                    if log_probs is None:
                        log_probs = logits.new_zeros(rows, max_new, logits.shape[-1])
                    log_probs[active, position] = torch.log_softmax(logits, dim=-1)
                length = position + 1
                finished = finished | torch.isin(tokens, eos)
                left = len(active) - int(finished.sum())
                if left == 0:
                    break
                if left <= len(active) * 7 // 8:
                    keep = (~finished).nonzero().squeeze(1)
                    step.keep(keep)
                    active, tokens, finished = active[keep], tokens[keep], finished[keep]
    finally:
        model.train(was_training)
    ids = ids[:, :length]
    return (ids, log_probs[:, :length]) if return_log_probs else ids


def sample_log_probs(model, states, ids, start_id):
    """Per-token log p(ids) (N, T) under `model` (possibly DDP-wrapped), the decoder reading
    `states` (N, P, H); gradients flow to the decoder and through `states`."""
    import torch

    start = torch.full((ids.shape[0], 1), start_id, dtype=ids.dtype, device=ids.device)
    logits = model(encoder_outputs=(states,), decoder_input_ids=torch.cat([start, ids[:, :-1]], 1),
                   use_cache=False).logits
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


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
        with self.autocast_smart_context_manager():
            # The one encoder pass, with gradients; generate and the scoring pass reuse it.
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
        # Score the policy that sampled: the decoder without dropout, as generate ran it
        # (eval mode stops dropout, not gradients). The encoding is the one sampled from.
        model.eval()
        try:
            with self.autocast_smart_context_manager():
                log_probs = sample_log_probs(model, states.repeat_interleave(k, dim=0), ids,
                                             unwrapped.config.decoder_start_token_id)
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

