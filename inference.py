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
import glob
import json
import os
import re
import sys

# Light imports only: torch and transformers load with the model, so --help answers at once.
from captioning.cli import (HelpFormatter, configure_runtime, error_exit, positive_float,
                            positive_int)
from captioning.fetch import DEFAULT_MAX_DOWNLOAD_MB, is_url

DEFAULT_MODEL_PATH = "./image_captioning_model"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- inputs

def expand_sources(values):
    """Each value: URL, file, directory (its images, sorted) or glob -> flat list of sources.
    A value that matches nothing is kept, so that it is reported as missing."""
    sources = []
    for value in values:
        if is_url(value):
            sources.append(value)
        elif os.path.isdir(value):
            sources += sorted(os.path.join(value, f) for f in os.listdir(value)
                              if f.lower().endswith(IMAGE_EXTENSIONS))
        elif not os.path.exists(value) and glob.has_magic(value):
            sources += sorted(glob.glob(value)) or [value]
        else:
            sources.append(value)
    return sources


def coco_image_id(source):
    """COCO_val2014_000000391895.jpg -> 391895 (None for other names)."""
    match = re.search(r"(\d{6,})\.\w+$", os.path.basename(source))
    return int(match.group(1)) if match else None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--image_path", nargs="+", required=True,
                   help="one or more http(s) URLs, image files, directories or globs")
    p.add_argument("--model_path", default=DEFAULT_MODEL_PATH,
                   help="trained model directory (train.py's --output_dir) or a Hub id")
    p.add_argument("--num_beams", type=positive_int, default=None,
                   help="beam width (default: the model's generation_config)")
    p.add_argument("--max_new_tokens", "--max_length", dest="max_new_tokens",
                   type=positive_int, default=None,
                   help="longest caption in tokens, EOS included, the start token not; the "
                        "same meaning as train.py's --max_new_tokens and dataloader.py's "
                        "--max_length (default: the model's generation_config)")
    p.add_argument("--no_repeat_ngram_size", type=positive_int, default=None,
                   help="forbid repeating n-grams of this size")
    p.add_argument("--length_penalty", type=float, default=None,
                   help="beam search length penalty (>1 favours longer captions)")
    p.add_argument("--batch_size", type=positive_int, default=16, help="images per generate call")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="where the model runs (auto: cuda, then mps, then cpu)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                   help="fp32: the model as trained, the reference. int8 (CPU only): every "
                        "linear layer of encoder and decoder dynamically quantized (int8 "
                        "weights, 7-bit on AVX2, a scale per output channel; 8-bit "
                        "activations, scaled per image in the encoder and cross-attention "
                        "keys/values; the LM head's top logits exact); demo "
                        "model: 98%% of test captions identical to fp32's, CIDEr 0.998x; a "
                        "caption can still depend on the other images of its batch through "
                        "the decoder's steps. bf16: weights in bfloat16; demo model 90%% "
                        "identical, CIDEr 0.999x; slower than fp32 on CPUs without native "
                        "bf16. auto: int8 on a CPU (meets the bar: >= 95%% identical, CIDEr "
                        "within 2%%), bf16 on a GPU of compute capability 8.0+ or fp16 on older "
                        "ones (as training picks), fp32 on mps. The choice and why are printed "
                        "once at start (stderr)")
    p.add_argument("--timeout", type=positive_float, default=10.0,
                   help="seconds allowed for connecting and for each read of a URL")
    p.add_argument("--max_download_mb", type=positive_float, default=DEFAULT_MAX_DOWNLOAD_MB,
                   help="largest image a URL may return")
    p.add_argument("--json", default=None, help='also write [{"image", "caption"}] to this file')
    p.add_argument("--coco_results", default=None,
                   help='also write [{"image_id", "caption"}] (COCO results format, for '
                        'metrics.py) to this file; needs COCO-style file names')
    p.add_argument("--workers", type=positive_int, default=8,
                   help="threads fetching and decoding images while the model runs")
    return p.parse_args(argv)


def model_path_problem(model_path):
    """A one-line reason why --model_path can't be a model, or None (a Hub id is left to
    from_pretrained)."""
    if os.path.isdir(model_path):
        if not os.path.isfile(os.path.join(model_path, "config.json")):
            return f"--model_path {model_path} holds no config.json: not a trained model"
        return None
    if os.path.exists(model_path):
        return f"--model_path {model_path} is not a directory"
    if model_path == DEFAULT_MODEL_PATH or model_path.startswith((".", "/", "~")):
        return (f"no model at {model_path}: train one with `make demo` (a tiny model in "
                f"data/demo/model) or train.py, or pass --model_path DIR_OR_HUB_ID")
    return None


def write_outputs(args, done):
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([{"image": s, "caption": c} for s, c in done], f, indent=2,
                      ensure_ascii=False)
    if args.coco_results:
        with open(args.coco_results, "w", encoding="utf-8") as f:
            json.dump([{"image_id": coco_image_id(s), "caption": c} for s, c in done
                       if coco_image_id(s) is not None], f, indent=2, ensure_ascii=False)


def main(argv=None):
    args = parse_args(argv)  # before any heavy import: --help answers at once
    configure_runtime()
    sources = expand_sources(args.image_path)
    problem = model_path_problem(args.model_path)
    if problem:
        return error_exit("inference.py", problem)

    from tqdm import tqdm

    from captioning.captioner import caption_sources, load_captioner
    from captioning.cli import quiet_transformers

    from captioning.devices import cuda_capability, pick_device, shard_range
    from captioning.quantize import resolve_precision

    quiet_transformers()
    device = pick_device(args.device)
    try:
        precision, reason = resolve_precision(args.precision, device.split(":")[0],
                                              cuda_capability())
    except ValueError as e:
        return error_exit("inference.py", e)
    rank, world = start_processes(device)
    if rank == 0:
        print(f"inference.py: precision {precision} ({reason})", file=sys.stderr)
    # Under a launcher each process captions its own contiguous shard; rank 0 writes the
    # whole result in input order.
    all_sources = sources
    start, end = shard_range(len(sources), rank, world)
    sources = sources[start:end]
    try:
        model, tokenizer, processor = load_captioner(args.model_path, device, precision)
    except (OSError, ValueError) as e:
        return error_exit("inference.py", f"cannot load model from {args.model_path}: "
                                          f"{str(e).strip() or type(e).__name__}")
    generate_kwargs = {k: getattr(args, k) for k in
                       ("num_beams", "max_new_tokens", "no_repeat_ngram_size", "length_penalty")
                       if getattr(args, k) is not None}
    done, failed = [], 0
    single = len(all_sources) == 1
    bar = tqdm(total=len(sources), unit="img", file=sys.stderr,
               disable=len(all_sources) <= 4 or rank != 0)
    for source, caption, error in caption_sources(
            sources, model, tokenizer, processor, batch_size=args.batch_size,
            workers=args.workers, timeout=args.timeout,
            max_bytes=int(args.max_download_mb * 2**20), **generate_kwargs):
        if error is not None:  # reported once, by the process that met it
            bar.write(f"{source}: {error}", file=sys.stderr)  # above the bar, never inside
            failed += 1
        else:
            if world == 1:  # one process streams; several print once all shards are in
                bar.write(caption if single else f"{source}\t{caption}", file=sys.stdout)
            done.append((source, caption))
        bar.update(1)
    bar.close()
    if world > 1:
        done, failed = gather_shards(done, failed, world)
        if rank == 0:
            for source, caption in done:
                print(caption if single else f"{source}\t{caption}")
    if rank == 0:
        write_outputs(args, done)
    return 1 if failed else 0


def start_processes(device):
    """(rank, world size): (0, 1) alone; under torchrun (WORLD_SIZE > 1) the process group
    is started, gloo on a CPU, nccl on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


def gather_shards(done, failed, world):
    """Every process's (captions, failure count) -> all captions in rank order (= input order,
    the shards being contiguous) and the total failures, on every process."""
    import torch.distributed as dist

    shards = [None] * world
    dist.all_gather_object(shards, (done, failed))
    dist.destroy_process_group()
    return [item for shard, _ in shards for item in shard], sum(n for _, n in shards)


if __name__ == "__main__":
    sys.exit(main())
