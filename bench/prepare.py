"""Data preparation, measured side by side in one run on the same COCO-layout folder of
photo-sized (640x480) JPEGs, 5 captions each, for a 224 px ViT image processor:

- ours: dataloader.py (uint8 pixels once per image, decoded in --num_proc
  processes, arrow shards, dynamic-length token ids)
- folder: dataloader.py --source folder on the same files, listed in a metadata.jsonl
- earlier take: one row per caption, float32 `pixel_values` from ViTImageProcessor, one
  process, `padding="max_length"`, a datasets.Dataset saved with save_to_disk
- floor: only decoding and resizing the same files (the same function, same processes), writing
  nothing

    python bench/prepare.py [--images 300] [--num_proc 2]

Each runs in its own process; it prints images/s, bytes on disk per image, peak RSS (from
the kernel's rusage of that process) and the ratios.
Targets: >= 4x the earlier take's images/s, <= 1/15 of its bytes per image, within 1.5x
of the floor's time, and the folder source within 10% of the COCO layout's time per image.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_photo_coco(root, n_train, n_val, seed=0):
    """COCO-layout folder of 640x480 JPEGs: a shape on a noisy background, so files are
    photo-like in size (~60-90 KB) and decoding cost."""
    import numpy as np
    from PIL import Image

    from captioning import shapes

    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    noise = [nrng.normal(0, 18, (480, 640, 3)) for _ in range(4)]
    os.makedirs(os.path.join(root, "annotations"))
    for folder, count, first in (("train2014", n_train, 1), ("val2014", n_val, 900000)):
        os.makedirs(os.path.join(root, folder))
        images, anns = [], []
        for i in range(count):
            color, shape = rng.choice(list(shapes.COLORS)), rng.choice(shapes.SHAPES)
            pos = rng.choice(list(shapes.POSITIONS))
            img = shapes.draw_shape_image(rng, color, shape, pos, size=(640, 480))
            arr = np.clip(np.asarray(img, dtype=np.float64) + noise[i % 4], 0, 255)
            name = f"COCO_{folder}_{first + i:012d}.jpg"
            Image.fromarray(arr.astype(np.uint8)).save(os.path.join(root, folder, name),
                                                       quality=90)
            images.append({"id": first + i, "file_name": name})
            for t in rng.sample(shapes.TEMPLATES, 5):
                anns.append({"image_id": first + i,
                             "caption": t.format(color=color, shape=shape, pos=pos)})
        with open(os.path.join(root, "annotations", f"captions_{folder}.json"), "w") as f:
            json.dump({"images": images, "annotations": anns}, f)


def du(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# ----------------------------------------------------------------------------- the three runs
# Each is called in a fresh process (`--run NAME`) and prints a JSON line of its results.

# Each imports its heavy modules before its clock starts (about 3 s for torch and
# transformers here): interpreter start-up is not per-image work.

def run_ours(coco, out, processor_dir, num_proc):
    import datasets.arrow_writer  # noqa: F401
    from transformers import AutoImageProcessor, GPT2Tokenizer  # noqa: F401  (lazy modules)

    import dataloader

    start = time.perf_counter()
    rc = dataloader.main(["--coco_dir", coco, "--save_path", out, "--encoder_model",
                          processor_dir, "--decoder_model", "tiny", "--val_size", "10",
                          "--test_size", "10", "--num_proc", str(num_proc), "--quiet"])
    seconds = time.perf_counter() - start
    assert rc == 0
    m = json.load(open(os.path.join(out, "manifest.json")))
    return {"seconds": seconds, "images": m["images"]["total"]["seen"],
            "rows": sum(m["rows"].values()), "bytes": du(out)}


def write_folder_metadata(coco):
    """The same COCO-layout files as an imagefolder: metadata.jsonl listing every train2014
    image (split train) and 20 val2014 images (10 validation, 10 test), as many as the COCO
    run decodes from val2014."""
    rows = []
    for folder in ("train2014", "val2014"):
        with open(os.path.join(coco, "annotations", f"captions_{folder}.json")) as f:
            data = json.load(f)
        caps = {}
        for a in data["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"])
        images = sorted(data["images"], key=lambda im: im["id"])
        if folder == "val2014":
            images = images[:20]
        for i, im in enumerate(images):
            split = "train" if folder == "train2014" else ("validation" if i < 10 else "test")
            rows.append({"file_name": f"{folder}/{im['file_name']}", "captions": caps[im["id"]],
                         "split": split})
    with open(os.path.join(coco, "metadata.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def run_folder(coco, out, processor_dir, num_proc):
    """dataloader.py --source folder on the same files (metadata.jsonl)."""
    import datasets.arrow_writer  # noqa: F401
    from transformers import AutoImageProcessor, GPT2Tokenizer  # noqa: F401  (lazy modules)

    import dataloader

    start = time.perf_counter()
    rc = dataloader.main(["--source", "folder", "--image_dir", coco, "--save_path", out,
                          "--encoder_model", processor_dir, "--decoder_model", "tiny",
                          "--num_proc", str(num_proc), "--quiet"])
    seconds = time.perf_counter() - start
    assert rc == 0
    m = json.load(open(os.path.join(out, "manifest.json")))
    return {"seconds": seconds, "images": m["images"]["total"]["seen"],
            "rows": sum(m["rows"].values()), "bytes": du(out)}


def run_earlier_take(coco, out, processor_dir, num_proc):
    """The earlier take's dataloader, as it worked: every caption its own row carrying its
    image's float32 pixels, captions padded to max_length, everything held, then saved."""
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoImageProcessor

    from captioning.modeling import train_tiny_tokenizer
    from captioning.sources import read_coco_split

    start = time.perf_counter()
    processor = AutoImageProcessor.from_pretrained(processor_dir)
    entries = (read_coco_split(coco, "train2014", "") + read_coco_split(coco, "val2014", ""))
    tokenizer = train_tiny_tokenizer(
        (c for e in entries for c in e["captions"]), os.path.join(out + "-tok"))
    rows = {"pixel_values": [], "labels": []}
    for e in entries:
        with Image.open(e["path"]) as img:
            if img.mode != "RGB":
                continue
            pixels = processor(images=img.convert("RGB"), return_tensors="np")["pixel_values"][0]
        for caption in e["captions"]:
            rows["pixel_values"].append(pixels)
            rows["labels"].append(tokenizer(caption, padding="max_length", max_length=32,
                                            truncation=True)["input_ids"])
    Dataset.from_dict(rows).save_to_disk(out)
    return {"seconds": time.perf_counter() - start, "images": len(entries),
            "rows": len(rows["labels"]), "bytes": du(out)}


def run_floor(coco, out, processor_dir, num_proc):
    from multiprocessing import Pool

    from transformers import AutoImageProcessor

    from captioning.images import decode_for_storage, processor_resample, processor_size

    start = time.perf_counter()
    processor = AutoImageProcessor.from_pretrained(processor_dir)
    size, resample = processor_size(processor), processor_resample(processor)
    paths = [os.path.join(coco, folder, f) for folder in ("train2014", "val2014")
             for f in sorted(os.listdir(os.path.join(coco, folder)))]
    jobs = [(p, size, resample, False) for p in paths]
    with Pool(num_proc) as pool:
        done = sum(1 for _ in pool.starmap(decode_for_storage, jobs, chunksize=8))
    return {"seconds": time.perf_counter() - start, "images": done, "rows": 0, "bytes": 0}


RUNS = {"ours": run_ours, "folder": run_folder, "earlier": run_earlier_take,
        "floor": run_floor}


def measure(name, coco, out, processor_dir, num_proc):
    """Run one method in a child process; -> its results plus its peak RSS."""
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--run", name,
                             "--coco", coco, "--out", out, "--processor", processor_dir,
                             "--num_proc", str(num_proc)], stdout=subprocess.PIPE, text=True)
    output = proc.stdout.read()
    _, status, rusage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"bench/prepare.py: the {name} run failed")
    result = json.loads(output.strip().splitlines()[-1])
    # ru_maxrss of the child itself; the decode workers are its children and counted apart
    result["peak_rss_mb"] = rusage.ru_maxrss / 1024
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=300, help="train2014 images (val2014 gets 30)")
    p.add_argument("--num_proc", type=int, default=2, help="decoding processes (ours, floor)")
    p.add_argument("--run", choices=sorted(RUNS), help=argparse.SUPPRESS)
    p.add_argument("--coco", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--processor", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run:
        print(json.dumps(RUNS[args.run](args.coco, args.out, args.processor, args.num_proc)))
        return

    from transformers import ViTImageProcessor

    with tempfile.TemporaryDirectory() as tmp:
        coco, processor_dir = os.path.join(tmp, "coco"), os.path.join(tmp, "vit224")
        make_photo_coco(coco, args.images, 30)
        write_folder_metadata(coco)
        ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(processor_dir)
        results = {name: measure(name, coco, os.path.join(tmp, name), processor_dir,
                                 args.num_proc) for name in ("ours", "folder", "earlier", "floor")}
    print(f"{args.images + 30} JPEGs 640x480, 5 captions each, 224 px processor, "
          f"{args.num_proc} processes for ours and floor")
    for name, r in results.items():
        per_image = f"{r['bytes'] / r['images'] / 1024:9.1f} KB/image" if r["bytes"] else " " * 17
        print(f"{name:<8} {r['images'] / r['seconds']:7.1f} images/s  {per_image}  "
              f"peak RSS {r['peak_rss_mb']:7.0f} MB  ({r['seconds']:.2f} s, {r['rows']} rows)")
    ours, earlier, floor = results["ours"], results["earlier"], results["floor"]
    speed = (ours["images"] / ours["seconds"]) / (earlier["images"] / earlier["seconds"])
    size = (ours["bytes"] / ours["images"]) / (earlier["bytes"] / earlier["images"])
    print(f"ours / earlier take speed: {speed:.1f}x (target >= 4x)")
    print(f"ours / earlier take bytes per image: 1/{1 / size:.0f} (target <= 1/15)")
    print(f"ours time / floor time: {ours['seconds'] / floor['seconds']:.2f}x (target <= 1.5x)")
    folder = results["folder"]
    print(f"folder source / COCO layout time per image: "
          f"{(folder['seconds'] / folder['images']) / (ours['seconds'] / ours['images']):.2f}x "
          f"(target within 10%)")


if __name__ == "__main__":
    main()
