"""The built-in captioning set: coloured shapes at positions, in the COCO 2014 layout.

`python dataloader.py --source shapes` writes it and then reads it like real COCO, so the
whole pipeline runs offline on real JPEG files. Deterministic for a given seed.
"""

import json
import os
import random

from PIL import Image, ImageDraw

from .sources import COCO_BASE_URL

# Coloured shapes at positions, each image with 4-6 differently worded captions. Small
# enough to learn in a minute on a CPU, varied enough that a model which ignores the image or
# never stops talking scores badly.

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
          "yellow": (235, 215, 20), "purple": (140, 40, 170), "orange": (245, 140, 20)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (0.25, 0.28), "top right": (0.75, 0.28), "center": (0.5, 0.5),
             "bottom left": (0.25, 0.72), "bottom right": (0.75, 0.72)}
TEMPLATES = ("a {color} {shape} in the {pos}",
             "a {shape} that is {color}, in the {pos}",
             "there is a {color} {shape} in the {pos} of the picture",
             "the {pos} of the image shows a {color} {shape}",
             "  A {color} {shape} sits in the {pos}. ",
             "a picture with a {color} {shape} at the {pos}")


def draw_shape_image(rng, color, shape, pos, size=(128, 96)):
    width, height = size
    shade = rng.randint(200, 250)
    img = Image.new("RGB", size, (shade, shade, shade))
    cx, cy = POSITIONS[pos][0] * width, POSITIONS[pos][1] * height
    r = rng.uniform(0.14, 0.2) * height
    cx, cy = cx + rng.uniform(-3, 3), cy + rng.uniform(-3, 3)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[color])
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=COLORS[color])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    return img


def make_shapes_coco(root, num_train=1000, num_val=300, seed=0):
    """Write a deterministic synthetic captioning set in the COCO 2014 layout under `root`.

    Every 20th image is grayscale, so the RGB filter has work to do, and one training file is
    truncated, so the unreadable-file path does too.
    """
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split, count, first_id in (("train2014", num_train, 1), ("val2014", num_val, 500000)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image_id = first_id + i
            color, shape, pos = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(POSITIONS))
            img = draw_shape_image(rng, color, shape, pos)
            if i % 20 == 19:
                img = img.convert("L")
            file_name = f"COCO_{split}_{image_id:012d}.jpg"
            path = os.path.join(root, split, file_name)
            img.save(path, quality=95)
            if split == "train2014" and i == 7:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
            images.append({"id": image_id, "file_name": file_name, "width": img.width,
                           "height": img.height, "coco_url": f"{COCO_BASE_URL}/{split}/{file_name}"})
            for template in rng.sample(TEMPLATES, rng.randint(4, 6)):
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "caption": template.format(color=color, shape=shape, pos=pos)})
        with open(os.path.join(root, "annotations", f"captions_{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations}, f)


def caption_attributes(caption):
    """-> (colour, shape, position) named in a caption of this set, each None where the
    caption names none or more than one. What a test CIDEr alone hides: whether a model
    sees the image (colour, shape, position) or only words it better."""
    text = " ".join(caption.lower().replace(",", " ").replace(".", " ").split())

    def one(names):
        found = [n for n in names if f" {n} " in f" {text} "]
        return found[0] if len(found) == 1 else None

    return one(COLORS), one(SHAPES), one(POSITIONS)


def attribute_accuracy(predictions):
    """train.py's test_predictions.json rows ({caption, references}) -> the share of
    captions that name the image's colour, shape, position, and all three, each read from
    the image's first reference."""
    hits = [0, 0, 0, 0]
    for row in predictions:
        truth = caption_attributes(row["references"][0])
        said = caption_attributes(row["caption"])
        right = [t is not None and t == s for t, s in zip(truth, said)]
        for i, ok in enumerate(right + [all(right)]):
            hits[i] += ok
    n = max(len(predictions), 1)
    return dict(zip(("color", "shape", "position", "all"), (h / n for h in hits)))
