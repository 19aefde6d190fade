"""Serve a demo page for a trained captioner: drop in an image, read its captions.

    python app.py --model_path ./image_captioning_model     # then open http://127.0.0.1:7860
    make app                                                 # the demo's model (make demo first)

The page (Gradio) takes an upload, a pasted image, an example from the built-in shapes set,
or a URL, and shows the caption, the best --num_captions beams with their scores, and
controls for beam width, sampling (temperature, top-p) and maximum length. It names the
model and shows its test metrics from metrics.json. Captions come from the code inference.py
uses (captioning/captioner.py), with the same limits; a bad input gets a one-line message on
the page and the server keeps answering. Concurrent requests are queued and batched.
"""

import argparse
import json
import os
import sys
import tempfile

# Light imports only: gradio, torch and transformers load after parsing, so --help is quick.
from captioning.cli import (HelpFormatter, configure_runtime, error_exit, positive_float,
                            positive_int)
from captioning.fetch import DEFAULT_MAX_DOWNLOAD_MB
from inference import DEFAULT_MODEL_PATH, model_path_problem


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model_path", default=DEFAULT_MODEL_PATH,
                   help="trained model directory (train.py's --output_dir) or a Hub id")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0: every interface, reachable from "
                        "other machines)")
    p.add_argument("--port", type=positive_int, default=7860, help="port to listen on")
    p.add_argument("--share", action="store_true",
                   help="also open a public *.gradio.live link through Gradio's relay "
                        "(needs the internet; off by default)")
    p.add_argument("--num_captions", type=positive_int, default=3,
                   help="best captions shown with their scores (beam search shows at most "
                        "the beam width)")
    p.add_argument("--max_batch_size", type=positive_int, default=8,
                   help="queued requests captioned together in one generate call")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="where the model runs (auto: cuda, then mps, then cpu)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                   help="as inference.py --precision (see its --help)")
    p.add_argument("--timeout", type=positive_float, default=10.0,
                   help="seconds allowed for connecting and for each read of a URL")
    p.add_argument("--max_download_mb", type=positive_float, default=DEFAULT_MAX_DOWNLOAD_MB,
                   help="largest image a URL may return or an upload may be")
    return p.parse_args(argv)


def read_json(path):
    """A JSON file as a dict; {} when it is missing, half-written or hand-edited (the page
    then shows no metrics, or the generate defaults)."""
    try:
        return json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else {}
    except ValueError:
        return {}


def main(argv=None):
    args = parse_args(argv)
    configure_runtime()
    problem = model_path_problem(args.model_path)
    if problem:
        return error_exit("app.py", problem)
    # Gradio would otherwise report usage to its servers and check for a newer version.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    # The page is served first and the model loads behind it: importing Gradio, torch and
    # transformers is most of a cold start, and a visitor needs a few seconds to pick an
    # image anyway. A request that comes sooner waits for the model (PageCaptioner.attach).
    # A Hub id has no local generation_config.json to take the page's defaults from, so
    # there the model loads first.
    local = os.path.isdir(args.model_path)
    loaded = None if local else load_model(args)
    if isinstance(loaded, int):
        return loaded
    from captioning.page import PageCaptioner, build_page, model_summary, write_examples

    max_bytes = int(args.max_download_mb * 2**20)
    captioner = PageCaptioner(args.num_captions, max_bytes, args.timeout)
    examples = tempfile.TemporaryDirectory(prefix="caption-examples-")
    # The page's defaults: generation_config.json, or (older captioners) config.json.
    generation = (read_json(os.path.join(args.model_path, "generation_config.json"))
                  or read_json(os.path.join(args.model_path, "config.json")) if local
                  else loaded[0].generation_config.to_dict())
    page = build_page(captioner, model_summary(args.model_path, read_json(
        os.path.join(args.model_path, "metrics.json"))), write_examples(examples.name),
        generation, args.max_batch_size)
    page.queue(max_size=256)
    # Gradio's own upload cap only guards the disk; uploads over --max_download_mb are
    # refused by our code, with our message, so its cap sits well above ours.
    page.launch(server_name=args.host, server_port=args.port, share=args.share,
                max_file_size=4 * max_bytes + 2**20, footer_links=["api"], quiet=False,
                theme=local_theme(), prevent_thread_lock=True)
    with examples:
        if loaded is None:
            print("app.py: page served; loading the model (requests wait for it)",
                  file=sys.stderr, flush=True)
        loaded = loaded or load_model(args)
        if isinstance(loaded, int):
            page.close()
            return loaded
        model, tokenizer, processor, precision = loaded
        # int8 scales activations per batch: batched with strangers' requests, a visitor's
        # caption could depend on their images. One request per generate call instead.
        captioner.attach(model, tokenizer, processor, one_request_per_call=precision == "int8")
        if precision == "int8":
            print("app.py: int8 captions one request per generate call", file=sys.stderr)
        print("app.py: model loaded, captioning", file=sys.stderr, flush=True)
        page.block_thread()
    return 0


def load_model(args):
    """-> (model, tokenizer, processor, precision), or error_exit's status."""
    from captioning.captioner import load_captioner
    from captioning.cli import quiet_transformers
    from captioning.devices import cuda_capability, pick_device
    from captioning.quantize import resolve_precision

    quiet_transformers()
    device = pick_device(args.device)
    try:
        precision, reason = resolve_precision(args.precision, device.split(":")[0],
                                              cuda_capability())
        model, tokenizer, processor = load_captioner(args.model_path, device, precision)
    except (OSError, ValueError) as e:
        return error_exit("app.py", f"cannot load model from {args.model_path}: "
                                    f"{str(e).strip() or type(e).__name__}")
    print(f"app.py: {args.model_path} on {device}, precision {precision} ({reason})",
          file=sys.stderr)
    return model, tokenizer, processor, precision


def local_theme():
    """Gradio's default theme with system fonts: the default loads fonts from Google, which
    an offline machine (or browser) waits on."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


if __name__ == "__main__":
    sys.exit(main())
