"""COCO 2014 for dataloader.py --download: the caption annotations, then only the images a
run selects, in parallel over one pooled HTTP client, with retries and backoff, resumable.

The real host (images.cocodataset.org) serves no captions_*.json of its own: only
annotations/annotations_trainval2014.zip (241 MB), which is streamed to disk (never held in
memory), resumed with a Range request after an interruption, checked, and only then are the
two caption files extracted from it. A mirror that serves the JSON files directly is used
as is. Images go through a temporary name, so a partial download never passes for one; an
image already on disk is not fetched again, and each image is decoded once, by the step that
builds the rows.
"""

import functools
import os
import shutil
import sys
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor

from .fetch import FetchError, looks_like_html
from .sources import COCO_FOLDERS

PERMANENT_HTTP = {400, 401, 403, 404, 410}  # no point retrying these
MAX_IMAGE_BYTES = 50 * 2**20
MAX_ANNOTATION_BYTES = 2 * 2**30  # annotations_trainval2014.zip is 241 MB; a caption JSON, tens of MB
ARCHIVE = "annotations_trainval2014.zip"


def with_retries(action, retries):
    """Run action() until it succeeds, retrying transient FetchErrors with exponential
    backoff. -> None, or the last error."""
    error = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
        try:
            action()
            return None
        except FetchError as e:
            error = e
            if e.status in PERMANENT_HTTP:
                break
    return error


def save_image(client, url, path):
    """One image to path through a temporary name; an HTML page is refused."""
    data = client.get_bytes(url, MAX_IMAGE_BYTES)
    if looks_like_html(data):
        raise FetchError("the URL returned an HTML page, not an image")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.part-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def is_present(path):
    return os.path.isfile(path) and os.path.getsize(path) > 0


def fetch_image(entry, client, retries):
    return with_retries(functools.partial(save_image, client, entry["url"], entry["path"]),
                        retries)


def fetch_missing(entries, *, client, workers, retries, quiet, counts):
    """Download the entries' images that are not on disk yet, with `workers` threads.
    Failures are counted and left to decoding to skip."""
    from tqdm import tqdm

    todo = [e for e in entries if not is_present(e["path"])]
    counts["already_present"] += len(entries) - len(todo)
    if not todo:
        return
    with ThreadPoolExecutor(workers) as pool, \
            tqdm(total=len(todo), desc="download  ", unit="img", file=sys.stderr,
                 disable=quiet, leave=False) as bar:
        fetch = functools.partial(fetch_image, client=client, retries=retries)
        for entry, error in zip(todo, pool.map(fetch, todo)):
            counts["downloaded" if error is None else "download_failed"] += 1
            if error is not None and not quiet:
                bar.write(f"{entry['url']}: {error}", file=sys.stderr)
            bar.update(1)


class MegabyteBar:
    """download progress(done, total) -> a tqdm bar counting MB (total may be unknown)."""

    def __init__(self, name, quiet):
        from tqdm import tqdm

        self.bar = tqdm(desc=name, unit="MB", file=sys.stderr, disable=quiet,
                        bar_format="{l_bar}{bar}| {n:.0f} MB [{elapsed}, {rate_fmt}]")

    def __call__(self, done, total):
        if total is not None and self.bar.total != total / 2**20:
            self.bar.total = total / 2**20
        self.bar.update(done / 2**20 - self.bar.n)

    def close(self):
        self.bar.close()


def download_streamed(client, url, path, retries, quiet):
    """A large file streamed to disk with a bar in MB, resumed where a .part was left."""
    bar = MegabyteBar(os.path.basename(path), quiet)
    try:
        return with_retries(functools.partial(client.download, url, path,
                                              MAX_ANNOTATION_BYTES, bar), retries)
    finally:
        bar.close()


def extract_captions(zip_path, names, ann_dir):
    """Check the archive and extract annotations/<name> for each name; all or nothing.
    A broken archive is deleted and reported (FileNotFoundError)."""
    parts = [(os.path.join(ann_dir, f"{name}.part"), os.path.join(ann_dir, name))
             for name in names]
    try:
        with zipfile.ZipFile(zip_path) as z:
            for name, (tmp, _) in zip(names, parts):
                with z.open(f"annotations/{name}") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)  # the CRC is checked at the end
    except (zipfile.BadZipFile, zlib.error, KeyError, EOFError) as e:  # the archive, not the disk
        for tmp, _ in parts:
            if os.path.exists(tmp):
                os.remove(tmp)
        os.remove(zip_path)
        raise FileNotFoundError(f"{zip_path} is broken ({e}); it was deleted, run again to "
                                f"download it anew") from None
    for tmp, final in parts:
        os.replace(tmp, final)


def fetch_annotations(coco_dir, base_url, client, retries=3, quiet=False):
    """captions_{train,val}2014.json: straight from a mirror that serves them, or else from
    the official annotations_trainval2014.zip (extracting only the caption files)."""
    ann_dir = os.path.join(coco_dir, "annotations")
    missing = [f"captions_{f}.json" for f in COCO_FOLDERS
               if not os.path.isfile(os.path.join(ann_dir, f"captions_{f}.json"))]
    zip_path = os.path.join(ann_dir, ARCHIVE)
    if not missing:
        return
    if not os.path.isfile(zip_path) and not os.path.isfile(f"{zip_path}.part"):
        missing = [n for n in missing if download_streamed(
            client, f"{base_url}/annotations/{n}", os.path.join(ann_dir, n), 0, True)]
    if not missing:
        return
    if not os.path.isfile(zip_path):
        error = download_streamed(client, f"{base_url}/annotations/{ARCHIVE}", zip_path,
                                  retries, quiet)
        if error is not None:
            raise FileNotFoundError(f"cannot download the COCO caption annotations: {error} "
                                    f"(what arrived is kept and resumed by the next run)")
    extract_captions(zip_path, missing, ann_dir)
