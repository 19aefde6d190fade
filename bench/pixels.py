"""How far the stored pixels are from ViTImageProcessor's, and what exactness would cost,
measured side by side on the same photo-sized JPEGs.

    python bench/pixels.py [--images 100] [--size 224]

- exact (dataloader.py and inference.py): the whole JPEG decoded, then one bilinear resize
  to the encoder's size (what ViTImageProcessor resizes from)
- draft (the earlier default): JPEG decoded at 1/2-1/8 scale, never below the encoder's
  edge, then the same resize
- processor: ViTImageProcessor itself, its normalised output mapped back to 0-255

Prints decode+resize images/s for each (best of 3), and the mean / 99.9th percentile / max
absolute difference of each against the processor, in grey levels (0-255).
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_photos(folder, n, seed=0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        # Smooth colour fields plus grain: photo-like detail at every scale.
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC),
                          dtype=np.float64)
        arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"photo_{i:04d}.jpg")
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100, help="640x480 JPEGs")
    p.add_argument("--size", type=int, default=224, help="encoder input edge")
    args = p.parse_args(argv)

    import numpy as np
    from PIL import Image
    from transformers import ViTImageProcessor

    from captioning.images import draft_box, image_to_uint8, load_uint8, open_image

    size, resample = (args.size, args.size), Image.Resampling.BILINEAR
    processor = ViTImageProcessor(size={"height": args.size, "width": args.size})
    mean = np.asarray(processor.image_mean).reshape(3, 1, 1)
    std = np.asarray(processor.image_std).reshape(3, 1, 1)

    def draft(path):
        with open_image(path, draft=draft_box(size)) as img:
            return image_to_uint8(img, size, resample)

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_photos(tmp, args.images)
        timings = {}
        for name, fn in (("exact", lambda q: load_uint8(q, size, resample)), ("draft", draft)):
            best = None
            for _ in range(3):
                start = time.perf_counter()
                out = [fn(q) for q in paths]
                best = min(best or 1e9, time.perf_counter() - start)
            timings[name] = (best, np.stack(out).astype(np.float64))
        theirs = []
        for q in paths:
            with Image.open(q) as img:
                px = processor(images=img.convert("RGB"), return_tensors="np")["pixel_values"][0]
            theirs.append((px * std + mean) * 255.0)
        theirs = np.stack(theirs)
    print(f"{args.images} JPEGs 640x480 -> {args.size} px, one process")
    for name, (seconds, pixels) in timings.items():
        diff = np.abs(pixels - theirs)
        print(f"{name:<6} {args.images / seconds:7.1f} images/s   vs ViTImageProcessor: mean "
              f"{diff.mean():.2f}, 99.9th pct {np.percentile(diff, 99.9):.1f}, max "
              f"{diff.max():.1f} grey levels")
    print(f"draft / exact speed: {timings['exact'][0] / timings['draft'][0]:.2f}x")


if __name__ == "__main__":
    main()
