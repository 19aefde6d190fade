"""GPT-2's cross-attention during generation, with the image's keys and values computed once
per image instead of once per beam, and never reordered by beam search.

generate(num_beams=k) repeats each image's encoder output k times, and transformers 5.24's
GPT-2 then (1) projects all k copies to cross-attention keys/values at the first step (the
c_attn of 12 layers over 197 image tokens: at batch 8, beam 3, about as many multiply-adds as
the whole ViT encoder, two thirds of them on copies), (2) keeps them in the EncoderDecoderCache,
whose reorder_cache copies all 12 layers' cross keys/values (350 MB at batch 8) at every
step although a beam only ever moves among its own image's beams, whose keys/values are the
same, and (3) passes them to SDPA as a transposed view, which is copied again at every step.
Profiled at full size, batch 8, 1 thread (bench/cpu.py's work, int8): (1) 14%, (2) 14% and
(3) about 17% of a generate call; fp32 alike.

shared_cross_attention (set as the cross-attention modules' forward, so that the state dict's
keys stay as they are) does the same arithmetic once per image: keys/values of the distinct
encoder rows only, kept contiguous on the cache object itself (outside the layers that
reorder_cache touches), and each image's beams' queries attend to them together. The same
captions as before (tests/test_quantize.py compares the generated ids with and without it);
int8 quantizes c_attn's input with the same per-tensor range (the copies add no new values).
Anything else (training, an encoder attention mask, attention weights asked for, GPT-2's fp16
upcast path) goes to the original module unchanged.

The override is a bound method on each module instance: save_pretrained and deepcopy are
unaffected, but a whole model pickled with torch.save does not load back (load the saved
directory with load_captioner instead).
"""

import math

import torch

_STORE = "_beam_shared_cross_kv"  # attribute on the EncoderDecoderCache: {layer: (k, v, g)}


def shared_cross_attention(inner, hidden_states, cache=None, attention_mask=None,
                           encoder_hidden_states=None, encoder_attention_mask=None,
                           output_attentions=False, **kwargs):
    """GPT2Attention(is_cross_attention=True).forward, keys/values shared over beams."""
    from transformers.cache_utils import EncoderDecoderCache

    if (not isinstance(cache, EncoderDecoderCache) or encoder_hidden_states is None
            or encoder_attention_mask is not None or output_attentions or inner.training
            or getattr(inner, "reorder_and_upcast_attn", False)):
        return type(inner).forward(inner, hidden_states, cache=cache,
                                   attention_mask=attention_mask,
                                   encoder_hidden_states=encoder_hidden_states,
                                   encoder_attention_mask=encoder_attention_mask,
                                   output_attentions=output_attentions, **kwargs)
    store = cache.__dict__.setdefault(_STORE, {})
    rows, length, width = hidden_states.shape
    # Keyed by shape, not by tensor identity: with an enc_to_dec_proj (encoder and decoder
    # widths differ) the encoder states are a new tensor at every step. generate makes a new
    # cache for every call; a cache object passed by hand to two calls with the same shapes
    # would reuse the first call's keys/values.
    made_for = tuple(encoder_hidden_states.shape)
    if inner.layer_idx not in store or store[inner.layer_idx][3] != made_for:
        group = _group_size(encoder_hidden_states)
        keys, values = cross_keys_values(inner, encoder_hidden_states[::group].contiguous())
        store[inner.layer_idx] = (keys.contiguous(), values.contiguous(), group, made_for)
    keys, values, group, _ = store[inner.layer_idx]
    images = keys.shape[0]
    heads, dim = inner.num_heads, inner.head_dim
    # (B*g, L, H*d) -> (B, H, g*L, d): an image's beams are consecutive rows, and
    # cross-attention has no causal mask, so they attend to its keys as one sequence.
    query = inner.q_attn(hidden_states).view(images, group, length, heads, dim)
    query = query.permute(0, 3, 1, 2, 4).reshape(images, heads, group * length, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, scale=inner.scaling)
    out = out.view(images, heads, group, length, dim).permute(0, 2, 3, 1, 4)
    out = inner.c_proj(out.reshape(rows, length, width))
    return inner.resid_dropout(out), None


def cross_keys_values(inner, encoder_states):
    """A GPT-2 cross-attention module's keys and values for encoder states (B, S, C), each
    (B, heads, S, head_dim): the projection GPT2Attention makes at its first step, done once
    per image by the callers (this module for beams, captioning/sampling.py for SCST)."""
    keys, values = inner.c_attn(encoder_states).split(inner.split_size, dim=2)
    shape = (*keys.shape[:-1], inner.num_heads, inner.head_dim)  # (B, S, H, d)
    return keys.view(shape).transpose(1, 2), values.view(shape).transpose(1, 2)


def _group_size(encoder_states):
    """The largest g such that the rows come in consecutive runs of g identical ones (what
    generate's expansion for beams or return sequences makes), 1 if none."""
    rows = encoder_states.shape[0]
    if rows < 2:
        return 1
    same = (encoder_states[1:] == encoder_states[:-1]).flatten(1).all(1).tolist()
    runs, run = [], 1
    for s in same:
        if s:
            run += 1
        else:
            runs.append(run)
            run = 1
    runs.append(run)
    g = 0
    for r in runs:
        g = math.gcd(g, r)
    return g


def share_cross_attention_over_beams(model):
    """A VisionEncoderDecoderModel with a GPT-2 decoder -> the same model, its cross-attention
    modules running shared_cross_attention (in place; other decoders are left alone)."""
    import types

    for block in getattr(getattr(model.decoder, "transformer", None), "h", []):
        cross = getattr(block, "crossattention", None)
        if cross is not None and hasattr(cross, "q_attn"):
            cross.forward = types.MethodType(shared_cross_attention, cross)
    return model
