"""Model, tokenizer and image helpers shared by dataloader.py, train.py and inference.py.

One concept, one place: how images become pixels, how the GPT-2 tokenizer is fixed up, and
how the ViT + GPT-2 VisionEncoderDecoderModel is built and reloaded all live here, so that
the data a model was trained on and the data it is asked to caption go through the same code.

The name "tiny" stands for a small randomly initialised model built from a config. It is
what `make demo` and the tests use, since this machine cannot reach the Hugging Face Hub.
"""

import argparse
import http.client
import io
import json
import os
import re
import sys
import urllib.error
import urllib.request

import numpy as np
from PIL import Image, ImageFile, ImageOps

# transformers' load reports and the "no torchvision, using the PIL backend" notice are noise
# for users of these scripts; TRANSFORMERS_VERBOSITY=warning brings them back.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TINY = "tiny"
TINY_IMAGE_SIZE = 64
# Big enough to learn the synthetic shapes set in about two minutes of CPU time. Measured on
# it (20 epochs): 16 px patches beat 8 px ones (test BLEU-4 0.76 vs 0.67, and faster), and
# GPT-2's default 0.1 dropout only slowed a model this small down (0.70 without it).
TINY_ENCODER = dict(patch_size=16, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=256)
TINY_DECODER = dict(n_embd=128, n_layer=2, n_head=4, n_positions=128,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
# Below ~512 a byte-level BPE splits ordinary words into letters, which makes captions long.
TINY_VOCAB_SIZE = 1024

# A truncated file must fail loudly, never be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless the help already says it or the option is
    required. Shared by the scripts' --help."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.required:
            return action.help
        return super()._get_help_string(action)


# ----------------------------------------------------------------------------- images

def quiet_transformers():
    """Hide transformers' own "Loading weights" / "Writing model shards" bars; download
    progress (huggingface_hub's) and training progress stay."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def processor_size(processor):
    """(height, width) the encoder expects, read from a ViT-style image processor."""
    size = processor.size
    if "height" in size:
        return int(size["height"]), int(size["width"])
    edge = int(size.get("shortest_edge", 224))
    return edge, edge


def processor_resample(processor):
    return Image.Resampling(int(getattr(processor, "resample", Image.Resampling.BILINEAR)))


def to_rgb(img):
    """Any PIL image as RGB: EXIF rotation applied, alpha composited on white, 16-bit and
    float modes scaled rather than clipped to white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def resize_to_uint8(img, size, resample=Image.Resampling.BILINEAR):
    """RGB PIL image -> uint8 array (3, H, W) at the encoder's input size.

    This is what dataloader.py stores: 4x smaller than float32 and exactly what the image
    processor would resize to. Normalisation happens later, in `normalize_pixels`.
    """
    height, width = size
    if img.size != (width, height):
        img = img.resize((width, height), resample=resample)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def normalize_pixels(uint8_batch, processor):
    """uint8 (B, 3, H, W) -> float32 tensor normalised with the processor's own numbers."""
    import torch

    scale = float(getattr(processor, "rescale_factor", 1 / 255))
    mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = torch.as_tensor(np.asarray(uint8_batch)).to(torch.float32) * scale
    return (pixels - mean) / std


def open_image(source, draft_size=None):
    """A path or raw bytes -> fully decoded PIL image (raises OSError on a bad file).

    With draft_size (width, height), a JPEG is decoded straight at 1/2, 1/4 or 1/8 scale,
    never below that size: most of the decoding time of a photo saved. dataloader.py and
    inference.py both decode this way, so a model sees at inference what it trained on.
    """
    img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    if draft_size is not None:
        img.draft(img.mode, draft_size)  # no-op for formats other than JPEG
    img.load()
    return img


def draft_size(processor):
    """The draft size for `open_image`: the encoder's input edge both ways, so that an
    EXIF rotation after decoding still leaves enough pixels."""
    edge = max(processor_size(processor))
    return edge, edge


def uint8_from_images(images, processor):
    """PIL images of any mode -> uint8 (B, 3, H, W) at the encoder's size: what dataloader.py
    stores, and what `normalize_pixels` turns into model input."""
    size, resample = processor_size(processor), processor_resample(processor)
    return np.stack([resize_to_uint8(to_rgb(img), size, resample) for img in images])


# ----------------------------------------------------------------------------- downloads
# inference.py fetches images by URL; dataloader.py --download fetches COCO. One client.

MAX_REDIRECTS = 5


class FetchError(Exception):
    """A URL could not be fetched; the message says why in one line. `status` is the HTTP
    status where the server answered with one."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class _LimitedRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.lower().startswith(("http://", "https://")):
            raise FetchError(f"redirect to a non-http(s) URL: {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(url, timeout, max_bytes):
    """GET an http(s) URL -> bytes, with a timeout per connect/read, at most 5 redirects and
    a size cap, so one bad server cannot hang or exhaust the run. A body shorter than its
    Content-Length is an error, never a short file. Raises FetchError (one-line reason)."""
    if not url.lower().startswith(("http://", "https://")):
        raise FetchError("only http(s) URLs are supported")
    opener = urllib.request.build_opener(_LimitedRedirects())
    request = urllib.request.Request(url, headers={"User-Agent": "image-captioning/1.0"})
    try:
        with opener.open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise FetchError(f"larger than the {max_bytes / 2**20:g} MB limit")
            body = response.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        if e.code in (301, 302, 303, 307, 308):
            raise FetchError(f"more than {MAX_REDIRECTS} redirects") from None
        raise FetchError(f"HTTP {e.code} {e.reason}", status=e.code) from None
    except urllib.error.URLError as e:
        raise FetchError(f"cannot fetch: {e.reason}") from None
    except (TimeoutError, OSError) as e:
        raise FetchError(f"cannot fetch: {str(e) or 'timed out'}") from None
    except http.client.HTTPException as e:  # IncompleteRead: the server hung up early
        raise FetchError(f"incomplete response: {type(e).__name__}") from None
    if len(body) > max_bytes:
        raise FetchError(f"larger than the {max_bytes / 2**20:g} MB limit")
    if length and length.isdigit() and len(body) < int(length):
        raise FetchError(f"incomplete response: {len(body)} of {length} bytes")
    return body


# ----------------------------------------------------------------------------- tokenizer

def fix_gpt2_tokens(tokenizer):
    """GPT-2 ships without a pad token; pad with EOS. Labels mask padding by length, never by
    id, so the one real EOS that ends each caption stays in the loss."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def train_tiny_tokenizer(captions, save_dir, vocab_size=TINY_VOCAB_SIZE):
    """A byte-level BPE trained on the training captions, saved as a GPT-2 tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(captions, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    os.makedirs(save_dir, exist_ok=True)
    bpe.save_model(save_dir)
    tokenizer = GPT2Tokenizer.from_pretrained(save_dir)
    for name in ("vocab.json", "merges.txt"):  # save_pretrained writes tokenizer.json instead
        os.remove(os.path.join(save_dir, name))
    return fix_gpt2_tokens(tokenizer)


def load_tokenizer(name_or_path):
    from transformers import AutoTokenizer

    return fix_gpt2_tokens(AutoTokenizer.from_pretrained(name_or_path))


def load_image_processor(name_or_path):
    from transformers import AutoImageProcessor, ViTImageProcessor

    if name_or_path == TINY:
        return ViTImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return AutoImageProcessor.from_pretrained(name_or_path)


# ----------------------------------------------------------------------------- model

def set_generation_defaults(model, tokenizer, max_length=32, num_beams=3):
    """GPT-2 has no start token of its own: decoding starts at BOS and pads with EOS. These
    live in the saved config and generation_config, so inference needs no extra flags."""
    from transformers import GenerationConfig

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    model.config.decoder_start_token_id = bos
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config = GenerationConfig(
        decoder_start_token_id=bos, bos_token_id=bos, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_length=max_length, num_beams=num_beams,
        early_stopping=True if num_beams > 1 else False)
    return model


def build_model(encoder_model, decoder_model, tokenizer, image_size, max_length=32, num_beams=3):
    """ViT encoder + GPT-2 decoder with cross-attention, joined as a VisionEncoderDecoderModel.

    `encoder_model` / `decoder_model` are Hub ids, local directories, or "tiny".
    """
    from transformers import (AutoConfig, GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel,
                              VisionEncoderDecoderModel, AutoModel, AutoModelForCausalLM)

    if encoder_model != TINY and decoder_model != TINY:
        # transformers 5.24 forgets is_decoder on GPT2Config when left to build the decoder
        # config itself (AttributeError), so hand it a finished one.
        decoder_config = AutoConfig.from_pretrained(decoder_model)
        decoder_config.is_decoder = True
        decoder_config.add_cross_attention = True
        model = VisionEncoderDecoderModel.from_encoder_decoder_pretrained(
            encoder_model, decoder_model, decoder_config=decoder_config)
    else:
        if encoder_model == TINY:
            # With the pooler (unused by the decoder), like a Hub ViTModel, so that a saved
            # model reloads with exactly the tensors it was saved with.
            encoder = ViTModel(ViTConfig(image_size=image_size[0], **TINY_ENCODER))
        else:
            encoder = AutoModel.from_pretrained(encoder_model)
        if decoder_model == TINY:
            decoder = GPT2LMHeadModel(GPT2Config(
                vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, is_decoder=True, add_cross_attention=True,
                **TINY_DECODER))
        else:
            config = AutoConfig.from_pretrained(decoder_model)
            config.is_decoder, config.add_cross_attention = True, True
            decoder = AutoModelForCausalLM.from_pretrained(decoder_model, config=config)
        model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    if model.decoder.get_input_embeddings().num_embeddings < len(tokenizer):
        model.decoder.resize_token_embeddings(len(tokenizer))
    return set_generation_defaults(model, tokenizer, max_length, num_beams)


def load_model_strict(model_dir, into=None):
    """Load a saved VisionEncoderDecoderModel and check that *every* tensor came back.

    transformers 5.x's Trainer reloads checkpoints (resume_from_checkpoint,
    load_best_model_at_end) with raw key names; the ViT keys were renamed, so only 73 of this
    model's 85 tensors are restored, with nothing but a warning. `from_pretrained` maps the
    names. With `into`, the loaded weights are copied into that model with strict=True.
    """
    from transformers import VisionEncoderDecoderModel

    loaded, info = VisionEncoderDecoderModel.from_pretrained(model_dir, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise RuntimeError(f"{model_dir}: checkpoint does not match the model: {bad}")
    if into is None:
        return loaded
    into.load_state_dict(loaded.state_dict(), strict=True)
    return into


def is_complete_checkpoint(path):
    """Trainer writes trainer_state.json last: a checkpoint killed while being saved has
    none, or half of one, and must not be resumed from."""
    from safetensors import safe_open

    try:
        read_json(os.path.join(path, "trainer_state.json"))
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            f.keys()
    except (OSError, ValueError):
        return False
    return all(os.path.isfile(os.path.join(path, name))
               for name in ("optimizer.pt", "scheduler.pt", "config.json"))


def find_resume_checkpoint(output_dir):
    """The newest complete checkpoint-N in output_dir, or None."""
    steps = sorted((int(m.group(1)), name) for name in os.listdir(output_dir)
                   if (m := re.fullmatch(r"checkpoint-(\d+)", name)))
    for _, name in reversed(steps):
        path = os.path.join(output_dir, name)
        if is_complete_checkpoint(path):
            return path
        print(f"skipping incomplete checkpoint {path}", file=sys.stderr)
    return None


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, obj):
    """Write through a temporary name so a crash never leaves half a JSON file behind."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- data on disk
# dataloader.py writes, train.py reads: <save_path>/manifest.json, the tokenizer and image
# processor files, and <save_path>/<split>/shard-NNNNN.arrow with one row per *image*.

SPLITS = ("train", "validation", "test")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def split_features(image_size):
    from datasets import Array3D, Features, List, Value

    return Features({
        "image_id": Value("int64"),
        "file_name": Value("string"),
        "pixel_values": Array3D(shape=(3, image_size[0], image_size[1]), dtype="uint8"),
        "captions": List(Value("string")),
        "caption_ids": List(List(Value("int32"))),  # each ends with the tokenizer's EOS
    })


def load_split(data_path, split):
    """One split as a memory-mapped Dataset. pixel_values come out as numpy uint8 (datasets'
    numpy/torch formats would widen them to int64, 8x the bytes); the rest as Python lists."""
    import glob

    import numpy as np

    from datasets import Dataset, concatenate_datasets

    shards = sorted(glob.glob(os.path.join(data_path, split, "shard-*.arrow")))
    if not shards:
        raise FileNotFoundError(f"{data_path}: no shards for split '{split}'")
    parts = [Dataset.from_file(path) for path in shards]
    ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    return ds.with_format("numpy", columns=["pixel_values"], dtype=np.uint8,
                          output_all_columns=True)
