"""Captioning many images with a trained model: inputs fetched and decoded in threads while
the model captions the previous batch, bad inputs reported one line each without stopping the
others. inference.py is a command line around `caption_sources`, app.py a web page around it.
"""

import collections
import functools
import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .devices import pick_device
from .fetch import DEFAULT_MAX_DOWNLOAD_MB, Client, FetchError, is_url, looks_like_html
from .images import load_uint8, normalize_pixels, processor_resample, processor_size
from .beamshare import share_cross_attention_over_beams
from .quantize import apply_precision
from .modeling import (decode_captions, fill_generation_ids, load_image_processor,
                       load_tokenizer, through_first_eos)


class InputError(Exception):
    """One input could not be turned into an image; the message names why."""


def read_source(source, client, max_bytes):
    """URL or path -> bytes or a path PIL can open, or InputError with a one-line reason."""
    if is_url(source):
        try:
            data = client.get_bytes(source, max_bytes)
        except FetchError as e:
            raise InputError(str(e)) from None
        if looks_like_html(data):
            raise InputError("the URL returned an HTML page, not an image")
        return data
    if not os.path.exists(source):
        raise InputError("no such file")
    if os.path.isdir(source):
        raise InputError("is a directory with no images")
    if os.path.getsize(source) == 0:
        raise InputError("empty file")
    return source


def load_pixels(source, size, resample, client, max_bytes):
    """URL or path -> the encoder's uint8 input through images.load_uint8 (the path training
    data takes), or InputError. Runs in the thread pool."""
    from PIL import Image, UnidentifiedImageError

    target = read_source(source, client, max_bytes)
    try:
        return load_uint8(target, size, resample)
    except UnidentifiedImageError:
        raise InputError("not an image") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"refused as a decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise InputError(f"unreadable image: {e}") from None


def iter_loaded(sources, pool, ahead, load, *load_args):
    """Yield (source, load(source, *load_args) or InputError) in input order, with at most
    `ahead` loads running in the pool, so a folder of 100,000 photos is never all in memory."""
    pending = collections.deque()
    todo = iter(sources)
    for source in itertools.islice(todo, ahead):
        pending.append((source, pool.submit(load, source, *load_args)))
    while pending:
        source, future = pending.popleft()
        following = next(todo, None)
        if following is not None:
            pending.append((following, pool.submit(load, following, *load_args)))
        try:
            yield source, future.result()
        except InputError as e:
            yield source, e


def load_captioner(model_path, device="auto", precision="fp32"):
    """A VisionEncoderDecoderModel directory or Hub id -> (model, tokenizer, processor), the
    model in `precision` (a mode resolved by quantize.resolve_precision: fp32, bf16, fp16,
    int8)."""
    from transformers import VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel.from_pretrained(model_path).to(pick_device(device)).eval()
    # Every mode: GPT-2's cross-attention keys/values once per image, not per beam, and never
    # reordered (captioning/beamshare.py says what that saves; the same captions).
    model = apply_precision(share_cross_attention_over_beams(model), precision)
    tokenizer = load_tokenizer(model_path)
    return fill_generation_ids(model, tokenizer), tokenizer, load_image_processor(model_path)


def _model_pixels(uint8_batch, model, processor):
    # In the model's own float type: bf16 and fp16 models take bf16/fp16 pixels; an int8
    # model keeps fp32 activations.
    return normalize_pixels(uint8_batch, processor).to(model.device, model.dtype)


def caption_pixels(uint8_batch, model, tokenizer, processor, **generate_kwargs):
    """uint8 (B, 3, H, W) at the encoder's size -> captions, one generate call."""
    import torch

    with torch.inference_mode():
        out = model.generate(pixel_values=_model_pixels(uint8_batch, model, processor),
                             **generate_kwargs)
    return decode_captions(out, tokenizer)


def ranked_captions(uint8_batch, model, tokenizer, processor, num_captions=3,
                    **generate_kwargs):
    """uint8 (B, 3, H, W) -> per image up to `num_captions` (caption, score), best first, one
    generate call. Beam search returns its best beams (at most the beam width) scored as it
    ranks them (log-probability / length ** length_penalty), so the first is the caption
    caption_pixels gives for the same settings; greedy and sampled captions get their mean
    token log-probability (under the sampling distribution when sampling)."""
    import torch

    config = model.generation_config
    sampling = generate_kwargs.get("do_sample", config.do_sample)
    beams = generate_kwargs.get("num_beams") or config.num_beams or 1
    k = max(1, num_captions if sampling else min(num_captions, beams))
    with torch.inference_mode():
        out = model.generate(pixel_values=_model_pixels(uint8_batch, model, processor),
                             num_return_sequences=k, return_dict_in_generate=True,
                             output_scores=True, **generate_kwargs)
        scores = getattr(out, "sequences_scores", None)
        if scores is None:
            scores = mean_token_logprob(model, out)
    captions = decode_captions(out.sequences, tokenizer)
    scores = scores.float().cpu().tolist()
    return [sorted(zip(captions[i:i + k], scores[i:i + k]), key=lambda cs: -cs[1])
            for i in range(0, len(captions), k)]


def mean_token_logprob(model, out):
    """Each generated sequence's mean log-probability per token, up to and including its
    first EOS (what follows is padding)."""
    import torch

    steps = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    generated = out.sequences[:, -steps.shape[1]:]
    valid, _ = through_first_eos(generated, model.generation_config.eos_token_id)
    steps = torch.where(valid, steps, torch.zeros_like(steps))
    return steps.sum(dim=1) / valid.sum(dim=1).clamp(min=1)


def caption_sources(sources, model, tokenizer, processor, batch_size=16, workers=8,
                    timeout=10.0, max_bytes=int(DEFAULT_MAX_DOWNLOAD_MB * 2**20),
                    num_captions=None, **generate_kwargs):
    """Yield (source, caption, None) or (source, None, InputError) for each source, in input
    order. With `num_captions`, each caption is instead ranked_captions' list of up to that
    many (caption, score), best first."""
    size, resample = processor_size(processor), processor_resample(processor)
    with ThreadPoolExecutor(workers) as pool, Client(workers, timeout) as client:
        loaded = iter_loaded(sources, pool, 2 * batch_size, load_pixels, size, resample,
                             client, max_bytes)
        caption = (caption_pixels if num_captions is None else
                   functools.partial(ranked_captions, num_captions=num_captions))
        while chunk := list(itertools.islice(loaded, batch_size)):
            good = [(s, px) for s, px in chunk if not isinstance(px, InputError)]
            captions = iter(caption(np.stack([px for _, px in good]), model, tokenizer,
                                    processor, **generate_kwargs) if good else [])
            for source, pixels in chunk:
                if isinstance(pixels, InputError):
                    yield source, None, pixels
                else:
                    yield source, next(captions), None
