"""The one image path (captioning.images), fast: modes, alpha, EXIF, bad files, and the same
pixels through dataloader.py's storage path and inference.py's path."""

import io

import numpy as np
import pytest
from PIL import Image

from captioning.captioner import InputError, load_pixels
from captioning.images import (decode_for_storage, image_to_uint8, normalize_pixels, to_rgb,
                               uint8_from_images)

BILINEAR = Image.Resampling.BILINEAR


def _exif_rotated_photo(path):
    """A 640x480 JPEG stored sideways with EXIF orientation 6 (display rotated 90 degrees
    clockwise): red on the stored left half, blue on the right. Shown upright, the top is
    red and the bottom blue."""
    arr = np.zeros((480, 640, 3), dtype=np.uint8)
    arr[:, :320] = (220, 20, 20)
    arr[:, 320:] = (20, 20, 220)
    rng = np.random.default_rng(0)
    arr = np.clip(arr.astype(int) + rng.integers(-15, 16, arr.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, quality=92, exif=exif)


def test_exif_rotated_photo_gives_identical_pixels_in_training_and_inference(tmp_path):
    path = str(tmp_path / "sideways.jpg")
    _exif_rotated_photo(path)
    size = (224, 224)
    status, stored = decode_for_storage(path, size, BILINEAR)  # dataloader.py
    served = load_pixels(path, size, BILINEAR, client=None, max_bytes=10**8)  # inference.py
    assert status == "ok"
    assert stored.dtype == served.dtype == np.uint8 and stored.shape == (3, 224, 224)
    assert np.array_equal(stored, served)
    # ... and both applied the rotation: upright, red on top, blue below.
    top, bottom = stored[:, :100].reshape(3, -1).mean(1), stored[:, -100:].reshape(3, -1).mean(1)
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    rgb = Image.new("RGB", (8, 8), (255, 0, 0))
    img = rgb.convert(mode) if mode not in ("I;16", "I", "F") else Image.fromarray(
        (np.arange(64).reshape(8, 8) * 100).astype({"I;16": np.uint16, "I": np.int32,
                                                     "F": np.float32}[mode]))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (8, 8)
    if mode in ("I;16", "I", "F"):  # scaled, not clipped to white
        arr = np.asarray(out)
        assert arr.min() == 0 and arr.max() == 255


def test_transparent_areas_become_white_and_exif_rotation_applies():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(rgba)).min() == 255
    img = Image.new("RGB", (6, 2))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert to_rgb(Image.open(buf)).size == (2, 6)


def test_decode_for_storage_classifies_bad_files(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(good)
    gray = tmp_path / "gray.jpg"
    Image.new("L", (40, 30), 128).save(gray)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (40, 30), (0, 0, 0, 0)).save(cmyk)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    size = (16, 16)
    status, pixels = decode_for_storage(str(good), size, BILINEAR)
    assert status == "ok" and pixels.shape == (3, 16, 16) and pixels.dtype == np.uint8
    assert abs(int(pixels[1].mean()) - 200) <= 2
    assert decode_for_storage(str(gray), size, BILINEAR)[0] == "non_rgb"
    assert decode_for_storage(str(cmyk), size, BILINEAR)[0] == "non_rgb"
    status, pixels = decode_for_storage(str(gray), size, BILINEAR, convert_grayscale=True)
    assert status == "converted" and pixels.shape == (3, 16, 16)
    for bad in (empty, truncated, tmp_path / "missing.jpg"):
        assert decode_for_storage(str(bad), size, BILINEAR)[0] == "unreadable"


def test_inference_path_refuses_bad_files_in_one_line(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name, reason in (("text.png", "not an image"), ("empty.jpg", "empty file"),
                         ("missing.jpg", "no such file")):
        with pytest.raises(InputError, match=reason):
            load_pixels(str(tmp_path / name), (16, 16), BILINEAR, client=None, max_bytes=10**6)


def test_normalisation_matches_the_image_processor():
    import torch
    from transformers import ViTImageProcessor

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    ours = normalize_pixels(uint8_from_images([img], processor), processor)
    theirs = torch.as_tensor(np.asarray(processor(images=img, return_tensors="np")["pixel_values"]))
    # uint8 storage rounds the resized pixel: at most half a grey level, 1/255 after scaling
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1.01 / 255 / min(processor.image_std)


def test_normalize_pixels_uses_processor_mean_and_std():
    import torch
    from transformers import ViTImageProcessor

    p = ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.25, 0.2])
    out = normalize_pixels(np.full((1, 3, 2, 2), 255, dtype=np.uint8), p)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([1.8, 3.2, 3.5]))


def test_image_to_uint8_resizes_once_to_the_encoder_size():
    img = Image.new("RGB", (300, 100), (0, 128, 255))
    out = image_to_uint8(img, (32, 48), BILINEAR)
    assert out.shape == (3, 32, 48) and tuple(out[:, 5, 5]) == (0, 128, 255)


def test_photo_pixels_equal_the_image_processors(tmp_path):
    """On a photo-sized JPEG the stored uint8 pixels are ViTImageProcessor's own, before its
    rescale and normalise (JPEG draft decoding, the earlier default, differed by up to 10
    grey levels: bench/pixels.py)."""
    from transformers import ViTImageProcessor

    from captioning.images import load_uint8

    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC))
    path = tmp_path / "photo.jpg"
    Image.fromarray(arr).save(path, quality=90)
    processor = ViTImageProcessor(size={"height": 224, "width": 224})
    ours = load_uint8(str(path), (224, 224), BILINEAR).astype(np.float64)
    with Image.open(path) as img:
        theirs = processor(images=img, return_tensors="np")["pixel_values"][0]
    theirs = (theirs * np.asarray(processor.image_std).reshape(3, 1, 1)
              + np.asarray(processor.image_mean).reshape(3, 1, 1)) * 255
    assert np.abs(ours - theirs).max() <= 0.51  # uint8 rounding only
