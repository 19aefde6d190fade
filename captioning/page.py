"""The demo page app.py serves: an image (upload, paste, or an example from the built-in
set) or a URL in; the caption, the best beams with their scores, or a one-line message out.

Every caption comes from captioner.caption_sources, the function inference.py calls: the same
reading (URL limits, HTML pages, bombs), the same image path (EXIF, modes, alpha) and the same
batched generate. The page adds the settings controls and the batching of concurrent
requests (Gradio's queue hands the function up to --max_batch_size waiting requests at once,
one batch at a time, so the model never runs two generates at the same time).
"""

import os
import threading

import gradio as gr

from .captioner import caption_sources
from .fetch import is_url, size_limit_message
from .shapes import draw_shape_image

NO_INPUT = ""  # nothing to caption (an image cleared): no message either


def uploaded_image(**kwargs):
    """A gr.Image that hands the uploaded file to the captioner as it came. gr.Image opens the
    file with PIL before our code sees it, so a text file named .png or a decompression bomb
    would fail inside Gradio with its own error instead of getting our one-line message.

    The override is on the instance, not a gr.Image subclass: Gradio's component metaclass
    writes a .pyi stub beside the module of every subclass when it is imported (gradio 6.31,
    component_meta.create_or_modify_pyi), and importing this module must not write files."""
    image = gr.Image(**kwargs)
    decode = image.preprocess

    def preprocess(payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return payload.path
        return decode(payload)  # a pasted data: URL, decoded to a file

    image.preprocess = preprocess
    return image


def one_line(error):
    text = " ".join(str(error).split())
    return f"Could not caption this image: {text}"


class PageCaptioner:
    """The page's batched event function: every input is a list (one entry per queued
    request); returns one list per output.

    app.py serves the page before the model has loaded (importing torch and transformers is
    most of a cold start): requests that arrive first wait in `__call__` until `attach`."""

    def __init__(self, num_captions, max_bytes, timeout):
        self.num_captions, self.max_bytes, self.timeout = num_captions, max_bytes, timeout
        self.model = self.tokenizer = self.processor = None
        self.one_request_per_call = False
        self.ready = threading.Event()

    def attach(self, model, tokenizer, processor, one_request_per_call=False):
        """The loaded model; from now on requests are captioned. one_request_per_call: every
        request gets its own generate call (int8 scales activations per batch, so a visitor's
        caption would otherwise depend on the strangers' images batched with it)."""
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.one_request_per_call = one_request_per_call
        self.ready.set()

    def problem(self, source, is_upload):
        if not source:
            return NO_INPUT
        if not is_upload and not is_url(source):
            # The URL box takes URLs only: a server path would let visitors read (or probe
            # for) the server's files.
            return one_line(f"not an http(s) URL: {source}")
        if is_upload and os.path.getsize(source) > self.max_bytes:
            # An upload gets the limit a URL gets (inference.py --max_download_mb).
            return one_line(f"the upload is {size_limit_message(self.max_bytes)}")
        return None

    @staticmethod
    def settings(beams, sampling, temperature, top_p, max_new_tokens):
        if sampling:
            return (("do_sample", True), ("num_beams", 1), ("temperature", float(temperature)),
                    ("top_p", float(top_p)), ("max_new_tokens", int(max_new_tokens)))
        return (("do_sample", False), ("num_beams", int(beams)),
                ("max_new_tokens", int(max_new_tokens)))

    def __call__(self, sources, beams, sampling, temperature, top_p, max_new_tokens,
                 is_upload=True):
        # Before grouping: whether requests may share a generate call is known only once
        # the model is attached (int8 or not).
        self.ready.wait()
        results = [("", [], "")] * len(sources)
        groups = {}  # requests with the same settings share one generate call
        for i, source in enumerate(sources):
            source = (source or "").strip()
            problem = self.problem(source, is_upload)
            if problem is not None:
                results[i] = ("", [], problem)
                continue
            key = self.settings(beams[i], sampling[i], temperature[i], top_p[i],
                                max_new_tokens[i])
            groups.setdefault((i if self.one_request_per_call else None, key), []).append(
                (i, source))
        for (_, key), items in groups.items():
            found = caption_sources([s for _, s in items], self.model, self.tokenizer,
                                    self.processor, batch_size=len(items),
                                    workers=min(8, len(items)), timeout=self.timeout,
                                    max_bytes=self.max_bytes, num_captions=self.num_captions,
                                    **dict(key))
            for (i, _), (_, ranked, error) in zip(items, found):
                results[i] = (("", [], one_line(error)) if error is not None else
                              (ranked[0][0], [[c, round(s, 4)] for c, s in ranked], ""))
        return [list(column) for column in zip(*results)]

    def caption_url(self, urls, *settings):
        return self(urls, *settings, is_upload=False)


def write_examples(folder, count=6):
    """A few images drawn like the built-in shapes set's (shapes.draw_shape_image), as JPEGs
    named after what they show."""
    import random

    rng = random.Random(0)
    combos = [("red", "circle", "top left"), ("blue", "square", "center"),
              ("green", "triangle", "bottom right"), ("yellow", "circle", "bottom left"),
              ("purple", "square", "top right"), ("orange", "triangle", "center")]
    os.makedirs(folder, exist_ok=True)
    paths = []
    for color, shape, pos in combos[:count]:
        path = os.path.join(folder, f"{color}_{shape}_{pos.replace(' ', '_')}.jpg")
        draw_shape_image(rng, color, shape, pos).save(path, quality=95)
        paths.append(path)
    return paths


def model_summary(model_path, metrics):
    """Markdown: which model is loaded and its test metrics (from metrics.json)."""
    from .scoring import TABLE_METRICS

    name = os.path.basename(os.path.abspath(model_path.rstrip("/"))) or model_path
    data = metrics.get("data", {})
    lines = [f"**Model:** `{name}` ({model_path})"
             + (f", encoder `{data['encoder_model']}`, decoder `{data['decoder_model']}`"
                if "encoder_model" in data else "")]
    test = metrics.get("test", {})
    shown = [k for k in TABLE_METRICS if k in test]
    if shown:
        lines += ["", f"Test metrics ({data.get('rows', {}).get('test', '?')} images, "
                      f"from metrics.json):", "",
                  "| " + " | ".join(shown) + " |", "|" + " --- |" * len(shown),
                  "| " + " | ".join(f"{test[k]:.4f}" for k in shown) + " |"]
    else:
        lines.append("\nNo metrics.json next to this model: no test metrics to show.")
    return "\n".join(lines)


def build_page(captioner, summary, examples, generation, max_batch_size):
    """-> gr.Blocks. `generation` holds the model's defaults (num_beams, max_new_tokens)."""
    beams = int(generation.get("num_beams") or 1)
    max_tokens = int(generation.get("max_new_tokens") or 32)
    with gr.Blocks(title="Image captioning demo", analytics_enabled=False) as page:
        gr.Markdown("# Image captioning\nDrop an image, paste one, pick an example, or give a "
                    "URL.")
        gr.Markdown(summary, elem_id="model")
        with gr.Row():
            with gr.Column():
                image = uploaded_image(type="filepath", sources=["upload", "clipboard"],
                                       label="Image", elem_id="image", height=320)
                url = gr.Textbox(label="Image URL (press Enter)", elem_id="url",
                                 placeholder="https://...")
                with gr.Accordion("Settings", open=False):
                    beam_width = gr.Slider(1, 10, value=beams, step=1, label="Beam width")
                    sampling = gr.Checkbox(False, label="Sample instead of beam search")
                    temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
                    length = gr.Slider(1, max(64, max_tokens), value=max_tokens, step=1,
                                       label="Maximum length (tokens)")
                button = gr.Button("Caption", variant="primary")
                if examples:
                    gr.Examples(examples=[[p] for p in examples], inputs=[image],
                                label="Examples from the built-in shapes set")
            with gr.Column():
                message = gr.Markdown("", elem_id="message")
                caption = gr.Textbox(label="Caption", elem_id="caption", interactive=False)
                ranked = gr.Dataframe(headers=["caption", "score"], label="Best captions",
                                      elem_id="ranked", interactive=False)
        settings = [beam_width, sampling, temperature, top_p, length]
        outputs = [caption, ranked, message]
        # One worker for both events ("model"): batches run one at a time.
        common = dict(outputs=outputs, batch=True, max_batch_size=max_batch_size,
                      concurrency_limit=1, concurrency_id="model")
        gr.on([image.change, button.click], captioner, inputs=[image, *settings],
              api_name="caption", **common)
        url.submit(captioner.caption_url, inputs=[url, *settings], api_name="caption_url",
                   **common)
    return page
