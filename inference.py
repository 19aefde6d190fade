"""Caption images with a trained (or published) ViT + GPT-2 VisionEncoderDecoderModel.

    python inference.py --image_path photo.jpg
    python inference.py --image_path https://example.com/cat.jpg --model_path ./image_captioning_model
    python inference.py --image_path ./photos/ "more/*.png" --json captions.json

One image prints just its caption; several print `source<TAB>caption` lines in input order.
A bad input (missing file, not an image, 404, timeout, too large) gets one line on stderr and
the others are still captioned. Exit code: 0 all captioned, 1 some failed, 2 usage error.
Decoding defaults come from the model's own generation_config.
"""

import argparse
import collections
import glob
import itertools
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

# Light: PIL and numpy only, torch and transformers are imported when a model is loaded, so
# --help answers at once. Importing it first also sets transformers' log level.
import numpy as np

from captioning import (FetchError, HelpFormatter, draft_size, fetch_url,
                        load_image_processor, load_tokenizer,
                        normalize_pixels, open_image, processor_resample, processor_size,
                        quiet_transformers, resize_to_uint8, to_rgb)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class InputError(Exception):
    """One input could not be turned into an image; the message names why."""


# ----------------------------------------------------------------------------- inputs

def expand_sources(values):
    """Each value: URL, file, directory (its images, sorted) or glob -> flat list of sources.
    A value that matches nothing is kept, so that it is reported as missing."""
    sources = []
    for value in values:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", value):
            sources.append(value)
        elif os.path.isdir(value):
            sources += sorted(os.path.join(value, f) for f in os.listdir(value)
                              if f.lower().endswith(IMAGE_EXTENSIONS))
        elif not os.path.exists(value) and glob.has_magic(value):
            sources += sorted(glob.glob(value)) or [value]
        else:
            sources.append(value)
    return sources


def load_source(source, timeout, max_bytes, draft=None):
    """URL or path -> RGB PIL image, or InputError with a one-line reason. `draft`: see
    captioning.open_image."""
    from PIL import Image, UnidentifiedImageError

    if "://" in source:
        try:
            data = fetch_url(source, timeout, max_bytes)
        except FetchError as e:
            raise InputError(str(e)) from None
        if data.lstrip()[:15].lower().startswith((b"<!doctype", b"<html")):
            raise InputError("the URL returned an HTML page, not an image")
        target = data
    else:
        if not os.path.exists(source):
            raise InputError("no such file")
        if os.path.isdir(source):
            raise InputError("is a directory with no images")
        if os.path.getsize(source) == 0:
            raise InputError("empty file")
        target = source
    try:
        return to_rgb(open_image(target, draft))
    except UnidentifiedImageError:
        raise InputError("not an image") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"refused as a decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise InputError(f"unreadable image: {e}") from None


def iter_loaded(sources, pool, ahead, load, *load_args):
    """Yield (source, load(source, *load_args) or InputError) in input order, with at most `ahead` fetches
    and decodes running in the thread pool, so a folder of 100,000 photos is never all in
    memory at once."""
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


# ----------------------------------------------------------------------------- captioning

def load_captioner(model_path, device):
    """A VisionEncoderDecoderModel directory or Hub id -> (model, tokenizer, processor)."""
    import torch
    from transformers import VisionEncoderDecoderModel

    quiet_transformers()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = VisionEncoderDecoderModel.from_pretrained(model_path).to(device).eval()
    tokenizer = load_tokenizer(model_path)
    # Published captioners (nlpconnect/vit-gpt2-image-captioning, say) keep their token ids
    # in config.json and may have no generation_config.json: fill what generate needs.
    gen, config = model.generation_config, model.config
    for name, fallback in (("decoder_start_token_id", tokenizer.bos_token_id),
                           ("eos_token_id", tokenizer.eos_token_id),
                           ("pad_token_id", tokenizer.pad_token_id)):
        if getattr(gen, name, None) is None:
            setattr(gen, name, getattr(config, name, None) if getattr(config, name, None)
                    is not None else fallback)
    return model, tokenizer, load_image_processor(model_path)


def caption_pixels(uint8_batch, model, tokenizer, processor, **generate_kwargs):
    """uint8 (B, 3, H, W) at the encoder's size -> captions, one generate call."""
    import torch

    pixels = normalize_pixels(uint8_batch, processor).to(model.device)
    with torch.inference_mode():
        out = model.generate(pixel_values=pixels, **generate_kwargs)
    return [" ".join(t.split()) for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


def load_pixels(source, timeout, max_bytes, processor):
    """load_source, then resized to the encoder's uint8 input (runs in the thread pool, so
    the main thread only stacks, normalises and generates)."""
    image = load_source(source, timeout, max_bytes, draft_size(processor))
    return resize_to_uint8(image, processor_size(processor), processor_resample(processor))


def caption_sources(sources, model, tokenizer, processor, batch_size=16, workers=8,
                    timeout=10.0, max_bytes=20 * 2**20, **generate_kwargs):
    """Yield (source, caption, None) or (source, None, InputError) for each source, in input
    order. Images are fetched and decoded in `workers` threads while the model captions the
    previous batch; bad inputs never stop the others."""
    with ThreadPoolExecutor(workers) as pool:
        loaded = iter_loaded(sources, pool, 2 * batch_size, load_pixels, timeout, max_bytes,
                             processor)
        while True:
            chunk = list(itertools.islice(loaded, batch_size))
            if not chunk:
                return
            good = [(s, img) for s, img in chunk if not isinstance(img, InputError)]
            captions = dict(zip([s for s, _ in good], caption_pixels(
                np.stack([px for _, px in good]), model, tokenizer, processor,
                **generate_kwargs))) if good else {}
            for source, image in chunk:
                if isinstance(image, InputError):
                    yield source, None, image
                else:
                    yield source, captions[source], None


def coco_image_id(source):
    """COCO_val2014_000000391895.jpg -> 391895 (None for other names)."""
    match = re.search(r"(\d{6,})\.\w+$", os.path.basename(source))
    return int(match.group(1)) if match else None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--image_path", nargs="+", required=True,
                   help="one or more http(s) URLs, image files, directories or globs")
    p.add_argument("--model_path", default="./image_captioning_model",
                   help="trained model directory (train.py's --output_dir) or a Hub id")
    p.add_argument("--num_beams", type=int, default=None,
                   help="beam width (default: the model's generation_config)")
    p.add_argument("--max_length", type=int, default=None,
                   help="longest caption in tokens (default: the model's generation_config)")
    p.add_argument("--no_repeat_ngram_size", type=int, default=None,
                   help="forbid repeating n-grams of this size")
    p.add_argument("--length_penalty", type=float, default=None,
                   help="beam search length penalty (>1 favours longer captions)")
    p.add_argument("--batch_size", type=int, default=16, help="images per generate call")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the model runs")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds allowed for connecting and for each read of a URL")
    p.add_argument("--max_download_mb", type=float, default=20.0,
                   help="largest image a URL may return")
    p.add_argument("--json", default=None, help='also write [{"image", "caption"}] to this file')
    p.add_argument("--coco_results", default=None,
                   help='also write [{"image_id", "caption"}] (COCO results format, for '
                        'metrics.py) to this file; needs COCO-style file names')
    p.add_argument("--workers", type=int, default=8,
                   help="threads fetching and decoding images while the model runs")
    args = p.parse_args(argv)
    for name in ("batch_size", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.num_beams is not None and args.num_beams < 1:
        p.error("--num_beams must be at least 1")
    if args.max_length is not None and args.max_length < 2:
        p.error("--max_length must be at least 2")
    return args


def main(argv=None):
    args = parse_args(argv)  # before any heavy import: --help answers at once
    sources = expand_sources(args.image_path)
    if not os.path.isdir(args.model_path) and os.path.exists(args.model_path):
        print(f"inference.py: error: --model_path {args.model_path} is not a directory",
              file=sys.stderr)
        return 2
    try:
        model, tokenizer, processor = load_captioner(args.model_path, args.device)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"inference.py: error: cannot load model from {args.model_path}: {first}",
              file=sys.stderr)
        return 2
    generate_kwargs = {k: getattr(args, k) for k in
                       ("num_beams", "max_length", "no_repeat_ngram_size", "length_penalty")
                       if getattr(args, k) is not None}
    if args.max_length is not None:
        generate_kwargs["max_new_tokens"] = generate_kwargs.pop("max_length")

    from tqdm import tqdm

    max_bytes = int(args.max_download_mb * 2**20)
    done, failed = [], 0
    bar = tqdm(total=len(sources), unit="img", file=sys.stderr, disable=len(sources) <= 4)
    for source, caption, error in caption_sources(
            sources, model, tokenizer, processor, batch_size=args.batch_size,
            workers=args.workers, timeout=args.timeout, max_bytes=max_bytes,
            **generate_kwargs):
        if error is not None:
            bar.write(f"{source}: {error}", file=sys.stderr)  # above the bar, never inside
            failed += 1
        else:
            bar.write(caption if len(sources) == 1 else f"{source}\t{caption}", file=sys.stdout)
            done.append((source, caption))
        bar.update(1)
    bar.close()

    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"image": s, "caption": c} for s, c in done], f, indent=2)
    if args.coco_results:
        with open(args.coco_results, "w") as f:
            json.dump([{"image_id": coco_image_id(s), "caption": c} for s, c in done
                       if coco_image_id(s) is not None], f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
