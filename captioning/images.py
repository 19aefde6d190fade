"""How an image becomes model input: file or bytes -> RGB (EXIF rotation, every mode, alpha on
white) -> uint8 (3, H, W) at the encoder's input size -> normalised float tensor.

This is the one path. dataloader.py stores `image_to_uint8`'s output, inference.py captions
it, and both reach it through `load_uint8` / `decode_for_storage`, so a model sees at
inference exactly the pixels it was trained on (tests/test_images.py checks an EXIF-rotated
photo through both scripts' paths).

Every image is decoded at full size and resized once with the processor's resampling, so the
uint8 pixels are exactly ViTImageProcessor's before its rescale and normalise: a model
trained here sees what the model-card snippet (AutoImageProcessor) gives it. JPEG draft
decoding (libjpeg scaling by 1/2-1/8 while decoding) was 1.3-1.4x faster on 640x480 photos
but differed from the processor by 1 grey level on average and up to 10 (bench/pixels.py),
so only that bench uses it. One difference remains, on purpose: EXIF rotation is applied
here and not by ViTImageProcessor, so for a rotated photo the model-card snippet should
apply `ImageOps.exif_transpose` first.
"""

import io

import numpy as np
from PIL import Image, ImageOps

HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "F")


def processor_size(processor):
    """(height, width) the encoder expects, read from a ViT-style image processor."""
    size = processor.size
    if "height" in size:
        return int(size["height"]), int(size["width"])
    edge = int(size.get("shortest_edge", 224))
    return edge, edge


def processor_resample(processor):
    return Image.Resampling(int(getattr(processor, "resample", Image.Resampling.BILINEAR)))


def open_image(source, draft=None):
    """A path or raw bytes -> fully decoded PIL image (raises OSError on a bad file).

    With draft (width, height), a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale
    that still covers that box; other formats ignore it (see the module docstring)."""
    img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    if draft is not None:
        img.draft(img.mode, draft)
    img.load()
    return img


def draft_box(size):
    """The draft box for an encoder input of `size` (height, width): its longest edge both
    ways, so that an EXIF rotation after decoding still leaves enough pixels."""
    edge = max(size)
    return edge, edge


def to_rgb(img):
    """Any PIL image as RGB: EXIF rotation applied, alpha composited on white, 16-bit and
    float modes scaled rather than clipped to white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in HIGH_BIT_MODES:
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


def image_to_uint8(img, size, resample=Image.Resampling.BILINEAR):
    """Any PIL image -> uint8 array (3, H, W) at `size` (height, width): to_rgb, then one
    resize. Normalisation happens later, in `normalize_pixels`."""
    img = to_rgb(img)
    height, width = size
    if img.size != (width, height):
        img = img.resize((width, height), resample=resample)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def load_uint8(source, size, resample=Image.Resampling.BILINEAR):
    """A path or bytes -> the encoder's uint8 input. Raises what PIL raises on a bad file."""
    with open_image(source) as img:
        return image_to_uint8(img, size, resample)


def decode_for_storage(path, size, resample, convert_grayscale=False):
    """dataloader.py's decode: -> (status, uint8 array or None), status one of ok, converted,
    non_rgb, unreadable. The pixels are load_uint8's. Never raises, so one bad file among
    100,000 can't stop a run; runs in worker processes."""
    try:
        with open_image(path) as img:
            if img.mode != "RGB" and not convert_grayscale:
                return "non_rgb", None
            status = "ok" if img.mode == "RGB" else "converted"
            return status, image_to_uint8(img, size, resample)
    except Exception:  # truncated, zero-byte, missing, not an image: all the same to us
        return "unreadable", None


def uint8_from_images(images, processor):
    """PIL images of any mode -> uint8 (B, 3, H, W) at the processor's size."""
    size, resample = processor_size(processor), processor_resample(processor)
    return np.stack([image_to_uint8(img, size, resample) for img in images])


def normalize_pixels(uint8_batch, processor):
    """uint8 (B, 3, H, W) -> float32 tensor normalised with the processor's own numbers."""
    import torch

    scale = float(getattr(processor, "rescale_factor", 1 / 255))
    mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = torch.as_tensor(np.asarray(uint8_batch)).to(torch.float32) * scale
    return (pixels - mean) / std
