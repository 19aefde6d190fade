"""COCO 2014 for dataloader.py --download: the caption annotations, then only the
images a run selects, in parallel, with retries and backoff, resumable.

A file is written under a temporary name and renamed when complete, so a partial download
never passes for an image; files already present and decodable are not fetched again.
"""

import os
import shutil
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

from .fetch import FetchError, fetch_url
from .images import open_image
from .sources import COCO_FOLDERS

PERMANENT_HTTP = {400, 401, 403, 404, 410}  # no point retrying these
MAX_IMAGE_BYTES = 50 * 2**20

def download_file(url, path, timeout, retries):
    """Fetch url to path through a temporary name, so a partial file never passes for a whole
    one. Retries transient failures with exponential backoff. -> None, or the error."""
    error = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
        try:
            data = fetch_url(url, timeout, MAX_IMAGE_BYTES)
        except FetchError as e:
            error = e
            if e.status in PERMANENT_HTTP:
                break
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.part-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return None
    return error


def is_decodable(path):
    try:
        with open_image(path, draft_box=(64, 64)):
            return True
    except Exception:
        return False


def fetch_missing(entries, args, counts):
    """Download the entries' images that are not already present and decodable, in parallel.
    Failures are counted and left to decoding to skip."""
    from tqdm import tqdm

    todo = [e for e in entries if not is_decodable(e["path"])]
    counts["already_present"] += len(entries) - len(todo)
    if not todo:
        return
    with ThreadPoolExecutor(args.download_workers) as pool, \
            tqdm(total=len(todo), desc="download  ", unit="img", file=sys.stderr,
                 disable=args.quiet, leave=False) as bar:
        for entry, error in zip(todo, pool.map(
                lambda e: download_file(e["url"], e["path"], args.timeout, args.retries), todo)):
            counts["downloaded" if error is None else "download_failed"] += 1
            if error is not None and not args.quiet:
                bar.write(f"{entry['url']}: {error}", file=sys.stderr)
            bar.update(1)


def fetch_annotations(coco_dir, base_url, args):
    """captions_{train,val}2014.json: straight from a mirror that serves them, or else from
    the official annotations_trainval2014.zip (extracting only the caption files)."""
    ann_dir = os.path.join(coco_dir, "annotations")
    needed = [f"captions_{f}.json" for f in COCO_FOLDERS]
    missing = [n for n in needed if not os.path.isfile(os.path.join(ann_dir, n))]
    failures = [n for n in missing if download_file(f"{base_url}/annotations/{n}",
                                                    os.path.join(ann_dir, n), args.timeout,
                                                    args.retries) is not None]
    if failures:
        zip_path = os.path.join(ann_dir, "annotations_trainval2014.zip")
        if not os.path.isfile(zip_path):
            print("downloading annotations_trainval2014.zip (241 MB)", file=sys.stderr)
            error = download_file(f"{base_url}/annotations/annotations_trainval2014.zip",
                                  zip_path, max(args.timeout, 60), args.retries)
            if error is not None:
                raise FileNotFoundError(f"cannot download the COCO caption annotations: {error}")
        with zipfile.ZipFile(zip_path) as z:
            for name in failures:
                with z.open(f"annotations/{name}") as src, \
                        open(os.path.join(ann_dir, name), "wb") as dst:
                    shutil.copyfileobj(src, dst)
