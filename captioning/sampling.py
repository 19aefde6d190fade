"""GPT-2 run by hand for self-critical training (captioning/scst.py): drawing captions from
an image encoding, and scoring the drawn captions with gradients.

Both exist because SCST's budget is "at most 3x a CE step", and at the demo's size an SCST
step through transformers' own forward cost about 4x:

- `generate_from_encoding` samples with a plain loop over a KV cache. At this size a
  decoding step is mostly per-call overhead (a step over 10 rows took 3.4 ms against 6.1 ms
  over 80), so `_GPT2Step` calls the layers' weights directly (addmm, layer_norm, bmm)
  instead of going through the modules and their mask and cache machinery.
- `sample_log_probs` is the one pass with gradients. The k samples of an image often share
  their first words, and every caption ends at its own length, so it runs the decoder's
  per-token layers once per distinct (image, prefix) and never over padding after EOS: a
  prefix tree. (Attention runs over per-image slots, at most k x T of them, so its work
  grows with k squared; at k = 5 and captions of ~10 tokens it is a small part of the pass.) On the demo model after
  10 CE epochs the distinct prefixes were 76 % of the sampled tokens and the sampled tokens
  75 % of the padded batch. After 200 SCST steps the samples agree more, and the share of
  distinct prefixes fell to 28 % (measured on 10 batches of 16 images x 5 samples).
  The cross-attention keys and values are computed once per image, not once per sample.

Either path gives transformers' numbers (tests/test_sampling.py compares distributions, log
probabilities and gradients with the model's own forward). A decoder that is not GPT-2 with
cross-attention, or GPT-2 with fp16's upcast attention, goes through its own forward.
"""

import contextlib
import functools

import numpy as np
import torch
import torch.nn.functional as F

from .beamshare import cross_keys_values


def lean_gpt2(decoder):
    """The GPT-2 modules the hand-written passes run, or None when the decoder is something
    else (then they call the decoder's own forward)."""
    from transformers import GPT2LMHeadModel

    if not isinstance(decoder, GPT2LMHeadModel) or not decoder.config.add_cross_attention:
        return None
    if getattr(decoder.config, "reorder_and_upcast_attn", False):
        # fp16 training upcasts GPT-2's attention (train.py, upcast_decoder_attention), which
        # the hand-written passes do not; the decoder's own forward keeps it.
        return None
    return decoder.transformer


def _activation(lm):
    act = lm.config.activation_function
    if act in ("gelu_new", "gelu_pytorch_tanh"):
        # gelu_new is this function written out in five Python-level ops (and five more in
        # the backward); the fused kernel is the same function to float rounding.
        return lambda x: F.gelu(x, approximate="tanh")
    return None


def _norm(module, x):
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


# ----------------------------------------------------------------------------- sampling

class _GPT2Step:
    """One decoding step of a GPT-2 decoder with cross-attention: GPT2LMHeadModel's forward
    at one new token per row with its KV cache, written out on the layers' weights. Self-
    attention keys/values go into buffers of max_new positions; the cross-attention
    keys/values are projected once per image and repeated over its k samples. Eval mode
    only (no dropout), and no attention masks: a caption attends to all of its own tokens
    and all patches, which is how sampling runs. The LM head is called as a module, so its
    hooks run."""

    def __init__(self, lm, encoded, k, max_new):
        t = lm.transformer
        self.lm, self.t, self.max_new = lm, t, max_new
        self.width = t.wte.weight.shape[1]
        self.layers = []
        for block in t.h:
            attn, cross = block.attn, block.crossattention
            heads, dim = attn.num_heads, attn.head_dim
            key, value = cross_keys_values(cross, encoded)  # (B, H, P, d), once per image
            if k > 1:
                key, value = key.repeat_interleave(k, dim=0), value.repeat_interleave(k, dim=0)
            self.layers.append({
                "block": block, "heads": heads, "dim": dim,
                "cross_keys": key.transpose(-1, -2).contiguous(),  # (N, H, d, P): ready for q @ k
                "cross_values": value.contiguous(),                # (N, H, P, d)
                "keys": None, "values": None})                     # (N, H, d, max_new), (N, H, max_new, d)
        self.act = _activation(lm)

    def keep(self, index):
        """Go on with these rows only."""
        for layer in self.layers:
            for name in ("cross_keys", "cross_values", "keys", "values"):
                if layer[name] is not None:
                    layer[name] = layer[name][index]

    def __call__(self, tokens, position):
        """tokens (N,) at `position` -> logits (N, V) for the next token."""
        n, width, p = tokens.shape[0], self.width, position + 1
        h = F.embedding(tokens, self.t.wte.weight) + self.t.wpe.weight[position]  # (N, C)
        for layer in self.layers:
            block, heads, dim = layer["block"], layer["heads"], layer["dim"]
            attn, cross, mlp = block.attn, block.crossattention, block.mlp
            qkv = torch.addmm(attn.c_attn.bias, _norm(block.ln_1, h), attn.c_attn.weight)
            if layer["keys"] is None:
                layer["keys"] = qkv.new_empty(n, heads, dim, self.max_new)
                layer["values"] = qkv.new_empty(n, heads, self.max_new, dim)
            keys, values = layer["keys"], layer["values"]
            keys[..., position] = qkv[:, width:2 * width].view(n, heads, dim)
            values[:, :, position] = qkv[:, 2 * width:].view(n, heads, dim)
            # A query against at most a few dozen keys: plain bmm + softmax beats
            # scaled_dot_product_attention's dispatch on a CPU.
            q = qkv[:, :width].reshape(n * heads, 1, dim)
            w = torch.bmm(q, keys.view(n * heads, dim, -1)[..., :p]).mul_(attn.scaling)
            out = torch.bmm(w.softmax(-1), values.view(n * heads, -1, dim)[:, :p])
            h = h + torch.addmm(attn.c_proj.bias, out.view(n, width), attn.c_proj.weight)
            q = torch.addmm(cross.q_attn.bias, _norm(block.ln_cross_attn, h), cross.q_attn.weight)
            w = torch.bmm(q.view(n * heads, 1, dim), layer["cross_keys"].flatten(0, 1))
            out = torch.bmm(w.mul_(cross.scaling).softmax(-1), layer["cross_values"].flatten(0, 1))
            h = h + torch.addmm(cross.c_proj.bias, out.view(n, width), cross.c_proj.weight)
            inner = torch.addmm(mlp.c_fc.bias, _norm(block.ln_2, h), mlp.c_fc.weight)
            inner = self.act(inner) if self.act else mlp.act(inner)
            h = h + torch.addmm(mlp.c_proj.bias, inner, mlp.c_proj.weight)
        return self.lm.lm_head(_norm(self.t.ln_f, h))


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


def draw(probs, u):
    """One token per row of `probs` (N, V) by inverting its cumulative distribution at the
    uniform numbers `u` (N, 1) in [0, 1): token i when cdf[i-1] <= u * total < cdf[i], so
    token i with probability probs[i] and never a zero-probability token. The same
    distribution as torch.multinomial(probs, 1), which at 80 rows x 350 tokens took about
    19x as long on this project's CPU machine (6.8 ms vs 0.36 ms each, under load). The sum
    runs in float64: in float32 over GPT-2's 50,257 tokens each token's mass is rounded to
    the grid near the running total (~6e-8), which leaves some tail tokens undrawable (MPS
    has no float64 and keeps float32)."""
    cdf = probs.to(_draw_dtype(probs.device)).cumsum(-1)
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    return picked.clamp_(max=probs.shape[-1] - 1)


def _draw_dtype(device):
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def generate_from_encoding(model, states, k, sample, return_log_probs=False, lean=True,
                           uniforms=None):
    """Captions from an encoding, under inference_mode and in eval mode (no dropout): k samples per
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
    config, generation = model.config, model.generation_config
    eos = config.eos_token_id if config.eos_token_id is not None else generation.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=states.device)
    pad = config.pad_token_id if config.pad_token_id is not None else int(eos[0])
    max_new = generation.max_new_tokens or generation.max_length - 1
    was_training = model.training
    model.eval()  # sample the policy that evaluation uses (no dropout)
    try:
        with torch.inference_mode():
            encoded = _to_decoder_width(model, states)
            if lean and lean_gpt2(model.decoder) is not None:
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
    ids = ids[:, :length].clone()  # a normal tensor again: the scoring pass indexes with it
    return (ids, log_probs[:, :length].clone()) if return_log_probs else ids


def _to_decoder_width(model, states):
    if getattr(model, "enc_to_dec_proj", None) is not None:
        return model.enc_to_dec_proj(states)  # as VisionEncoderDecoderModel does
    return states


# ----------------------------------------------------------------------------- scoring

def sample_log_probs(model, unwrapped, states, ids, k, mask):
    """log p of each sampled token (N, T) under `model`, which is `unwrapped` itself or a
    wrapper of it (DDP, DataParallel, ...), the decoder reading image i's encoding states[i]
    (B, P, H) for rows i*k .. i*k+k-1 of `ids` (N, T), and 0 where `mask` (N, T: each row's
    tokens through its first EOS, a prefix) is False. Gradients flow to the decoder and
    through `states`. Eval mode only (the prefix-tree pass applies no dropout).

    A GPT-2 decoder, bare or under DDP, runs through `_prefix_tree_log_probs`, called as the
    module's forward through `model` (so that DDP's forward arms its gradient all-reduce).
    Anything else, and any other wrapper (DataParallel scatters the batch over devices; FSDP
    gathers its weights in its forward), goes through the model's own forward over the
    padded batch."""
    from torch.nn.parallel import DistributedDataParallel

    bare_or_ddp = model is unwrapped or (isinstance(model, DistributedDataParallel)
                                         and model.module is unwrapped)
    if bare_or_ddp and lean_gpt2(unwrapped.decoder) is not None:
        if unwrapped.training:
            raise RuntimeError("sample_log_probs runs in eval mode (SCSTTrainer calls "
                               "model.eval() around it): the prefix-tree pass has no dropout")
        forward = functools.partial(_prefix_tree_log_probs, unwrapped, ids=ids, k=k, mask=mask)
        with _forward_replaced(unwrapped, forward):
            return model(states)
    start = torch.full((ids.shape[0], 1), unwrapped.config.decoder_start_token_id,
                       dtype=ids.dtype, device=ids.device)
    logits = model(encoder_outputs=(states.repeat_interleave(k, dim=0),),
                   decoder_input_ids=torch.cat([start, ids[:, :-1]], 1), use_cache=False).logits
    log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return log_probs * mask


@contextlib.contextmanager
def _forward_replaced(module, forward):
    """`module.forward` is `forward` inside the block. The instance attribute that
    accelerate may have set (its mixed-precision wrapper) is put back afterwards."""
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had:
            module.forward = previous
        else:
            del module.forward


def prefix_tree(ids, mask, k):
    """The distinct decoder inputs of a sampled batch. The decoder's state at position t of a
    row depends only on its image and the tokens before t, so rows of one image that share
    their first t tokens share it. `mask` (N, T) marks each row's tokens, a prefix of it.
    -> dict of tensors on ids' device:

    - reads (L,): the state each marked position reads, in the order of ids[mask];
    - token (M,): each state's input token (-1 at depth 0, where the start token goes),
      depth (M,), image (M,);
    - slot (M,): its place among its image's states in order of creation, so that a state's
      ancestors come before it; size: the most states an image has;
    - ancestors (B, size, size) bool: slot j is slot i's ancestor or i itself (a padding
      slot sees only itself).

    A walk in Python over the sampled tokens (a dict of prefixes), then the ancestors
    depth by depth in torch."""
    lengths, rows = mask.sum(1).tolist(), ids.tolist()
    images = len(rows) // k
    state_of_prefix, token, depth, image, slot, parent, reads = {}, [], [], [], [], [], []
    used = [0] * images  # slots taken per image
    for i, (row, length) in enumerate(zip(rows, lengths)):
        # A prefix is keyed by (its parent's state, its last token); the empty one by image.
        key, parent_state = ("image", i // k), -1
        for position in range(length):
            state = state_of_prefix.get(key)
            if state is None:
                state = state_of_prefix[key] = len(token)
                token.append(row[position - 1] if position else -1)
                depth.append(position)
                image.append(i // k)
                parent.append(parent_state)
                slot.append(used[i // k])
                used[i // k] += 1
            reads.append(state)
            parent_state, key = state, (state, row[position])
    # via numpy: torch.tensor on a Python list of a few thousand ints costs milliseconds
    token, depth, image, slot, parent, reads = (
        torch.from_numpy(np.array(v, dtype=np.int64))
        for v in (token, depth, image, slot, parent, reads))
    size = max(used)
    ancestors = torch.zeros(images, size, size, dtype=torch.bool)
    ancestors[:, torch.arange(size), torch.arange(size)] = True
    # A state's ancestors are its parent's and itself: depth by depth, parents first.
    for d in range(1, int(depth.max()) + 1):
        at = (depth == d).nonzero().squeeze(1)
        up = parent[at]
        ancestors[image[at], slot[at]] |= ancestors[image[up], slot[up]]
    device = ids.device
    return dict(size=size, ancestors=ancestors.to(device),
                **{name: v.to(device) for name, v in (("reads", reads), ("token", token),
                                                      ("depth", depth), ("image", image),
                                                      ("slot", slot))})


def _prefix_tree_log_probs(model, states, *, ids, k, mask):
    """sample_log_probs for a GPT-2 decoder, over the prefix tree's distinct states: token
    embeddings, layer norms, projections, MLP and LM head run on the M states only; the
    attention puts them in per-image slots (B, size), self-attention masked to each
    state's ancestors, cross-attention to its image's keys/values (projected once per
    image). Dropout is not applied: the scoring pass runs in eval mode."""
    lm = model.decoder
    gpt2 = lm.transformer
    tree = prefix_tree(ids, mask, k)
    token = tree["token"].clamp(min=0)
    token = torch.where(tree["depth"] == 0, model.config.decoder_start_token_id, token)
    h = F.embedding(token, gpt2.wte.weight) + F.embedding(tree["depth"], gpt2.wpe.weight)  # (M, C)
    encoded = _to_decoder_width(model, states)
    images, size, width = encoded.shape[0], tree["size"], h.shape[1]
    where = tree["image"] * size + tree["slot"]  # each state's row in the (B * size) layout
    allowed = tree["ancestors"][:, None]  # (B, 1, size, size)
    act = _activation(lm)

    for block in gpt2.h:
        attn, cross, mlp = block.attn, block.crossattention, block.mlp
        heads = attn.num_heads
        q, key, value = (_to_slots(x, where, images, size, heads)
                         for x in attn.c_attn(block.ln_1(h)).split(width, dim=1))
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=allowed, scale=attn.scaling)
        h = h + attn.c_proj(_from_slots(out, where))
        q = _to_slots(cross.q_attn(block.ln_cross_attn(h)), where, images, size, heads)
        key, value = cross_keys_values(cross, encoded)  # once per image
        out = F.scaled_dot_product_attention(q, key, value, scale=cross.scaling)
        h = h + cross.c_proj(_from_slots(out, where))
        inner = mlp.c_fc(block.ln_2(h))
        h = h + mlp.c_proj(act(inner) if act else mlp.act(inner))
    log_probs = torch.log_softmax(lm.lm_head(gpt2.ln_f(h)).float(), dim=-1)  # (M, V)
    picked = log_probs[tree["reads"], ids[mask]]
    return log_probs.new_zeros(ids.shape).masked_scatter(mask, picked)


def _to_slots(x, where, images, size, heads):
    """(M, X) per state -> (B, heads, size, X / heads), zeros in the empty slots."""
    padded = x.new_zeros(images * size, x.shape[1]).index_copy(0, where, x)
    return padded.view(images, size, heads, -1).transpose(1, 2)


def _from_slots(x, where):
    """(B, heads, size, d) -> (M, heads * d), the states' slots only."""
    images, heads, size, dim = x.shape
    return x.transpose(1, 2).reshape(images * size, heads * dim)[where]
