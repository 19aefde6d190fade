"""The model card train.py writes into --output_dir as README.md, the way the Hub shows one.

The YAML front matter (pipeline tag, library, tags, datasets, model-index metrics) is built
with huggingface_hub's ModelCardData, which renders it the way the Hub parses it; the body
says what the model was trained on (from the manifest, with its counts), how, how well (the
test metrics), and how to use it. Everything comes from the dicts train.py already writes
(manifest, train_args, metrics), so a card can also be rebuilt from metrics.json.
"""

import json
import os

from .scoring import METRIC_NAMES, TABLE_METRICS

# model-index metric ids (the Hub links these to its metric pages) and display names.
METRIC_IDS = {"bleu1": ("bleu", "BLEU-1"), "bleu2": ("bleu", "BLEU-2"),
              "bleu3": ("bleu", "BLEU-3"), "bleu4": ("bleu", "BLEU-4"),
              "meteor": ("meteor", "METEOR"), "rougeL": ("rouge", "ROUGE-L"),
              "rouge2": ("rouge", "ROUGE-2"), "cider": ("cider", "CIDEr")}

# Where the data came from -> (dataset id for the `datasets:` field, readable name).
SOURCE_NAMES = {"coco": ("coco-2014", "COCO 2014 captions"),
                "karpathy": ("karpathy-split", "Karpathy split"),
                "shapes": ("synthetic-shapes", "the built-in synthetic shapes set"),
                "folder": ("imagefolder", "an image folder with captions")}

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

An image captioner: a ViT encoder and a GPT-2 decoder joined in transformers'
`VisionEncoderDecoderModel` (encoder `{{ encoder }}`, decoder `{{ decoder }}`{{ origin }}),
trained on {{ dataset_name }} with this project's `train.py` (`Seq2SeqTrainer`).

## Usage

```python
{{ snippet }}
```

`ViTImageProcessor` does not apply EXIF rotation; for a rotated photo call
`PIL.ImageOps.exif_transpose` on the image first (the project's own scripts do).

With the project checked out, `inference.py` captions files, folders, globs and URLs in
batches, and `app.py` serves a demo page:

```bash
python inference.py --model_path {{ model_ref }} --image_path photo.jpg
python app.py --model_path {{ model_ref }}   # then open http://127.0.0.1:7860
```

## Training data

Trained on {{ dataset_name }} (`--source {{ source }}`, split `{{ split }}`{{ data_at }}).
Images are stored at {{ image_size }} px; captions are at most {{ max_length }} tokens
(EOS included){{ truncated }}.

| split | images | captions |
| --- | --- | --- |
{{ data_rows }}

{{ dropped }}

## Training settings

| setting | value |
| --- | --- |
{{ settings_rows }}

## Test metrics

On the held-out test split ({{ test_images }} images), every caption scored against all of
its image's references with the COCO caption metrics:

| {{ metric_head }} |
|{{ metric_rule }}
| {{ metric_values }} |
"""


def snippet(model_ref, image="photo.jpg"):
    """The usage snippet: imports, then three lines from an image file to its caption."""
    return (f"from PIL import Image\n"
            f"from transformers import AutoImageProcessor, AutoTokenizer, "
            f"VisionEncoderDecoderModel\n\n"
            f"model, tokenizer, processor = (cls.from_pretrained({model_ref!r}) for cls in "
            f"(VisionEncoderDecoderModel, AutoTokenizer, AutoImageProcessor))\n"
            f"pixels = processor(images=Image.open({image!r}).convert('RGB'), "
            f"return_tensors='pt').pixel_values\n"
            f"print(tokenizer.decode(model.generate(pixel_values=pixels)[0], "
            f"skip_special_tokens=True))")


def dataset_of(manifest):
    """-> (dataset id, readable name) for the card's `datasets:` and its text."""
    if manifest.get("source") == "hub":
        return str(manifest["data"]), f"the Hugging Face dataset `{manifest['data']}`"
    if manifest.get("source") == "coco" and manifest.get("split") == "karpathy":
        return SOURCE_NAMES["karpathy"][0], "COCO 2014 (Karpathy split)"
    return SOURCE_NAMES.get(manifest.get("source"), ("custom", "a custom caption set"))


def card_data(model_name, manifest, test_metrics):
    from huggingface_hub import EvalResult, ModelCardData

    dataset_id, dataset_name = dataset_of(manifest)
    results = [EvalResult(task_type="image-to-text", task_name="Image captioning",
                          dataset_type=dataset_id, dataset_name=dataset_name,
                          dataset_split="test", metric_type=METRIC_IDS[k][0],
                          metric_name=METRIC_IDS[k][1], metric_value=float(test_metrics[k]))
               for k in METRIC_NAMES if k in test_metrics]
    tags = ["image-captioning", "vision-encoder-decoder", "vit", "gpt2"]
    return ModelCardData(pipeline_tag="image-to-text", library_name="transformers",
                         tags=tags, datasets=[dataset_id], metrics=["bleu", "meteor", "rouge",
                                                                    "cider"],
                         model_name=model_name, eval_results=results or None)


def _settings(train_args, train_metrics, generation):
    rows = {"epochs": train_args.get("epochs"), "optimizer steps": train_metrics.get("global_step"),
            "batch size (per step and process)": train_args.get("batch_size"),
            "gradient accumulation": train_args.get("gradient_accumulation_steps"),
            "learning rate (AdamW, linear decay)": train_args.get("lr"),
            "warm-up steps": train_args.get("warmup_steps"),
            "weight decay": train_args.get("weight_decay"),
            "precision": train_args.get("precision_used", train_args.get("precision")),
            "frozen": ", ".join(k for k in ("encoder", "decoder")
                                if train_args.get(f"freeze_{k}")) or "nothing",
            "best checkpoint by": train_args.get("metric_for_best_model"),
            "seed": train_args.get("seed"),
            "generation: beams": generation.get("num_beams"),
            "generation: max new tokens": generation.get("max_new_tokens"),
            "training time (s)": train_metrics.get("train_runtime")}
    return "\n".join(f"| {k} | {v} |" for k, v in rows.items() if v is not None)


def _data_rows(manifest):
    rows, captions = manifest.get("rows", {}), manifest.get("captions", {})
    return "\n".join(f"| {split} | {rows[split]:,} | {captions.get(split, 0):,} |"
                     for split in ("train", "validation", "test") if split in rows)


def _dropped(manifest):
    total = manifest.get("images", {}).get("total", {})
    parts = [f"{total[k]:,} {label}" for k, label in
             (("dropped_non_rgb", "non-RGB images dropped"),
              ("converted_non_rgb", "non-RGB images converted to RGB"),
              ("dropped_unreadable", "unreadable files skipped"))
             if total.get(k)]
    return ("Of {:,} images seen: {}.".format(total["seen"], ", ".join(parts))
            if parts and total.get("seen") else "")


def render(model_ref, model_name, manifest, train_args, metrics, generation):
    """-> the card's text. `model_ref` is what the snippet and the commands load: the output
    directory for the card written next to the model, the repo id for the one pushed."""
    from huggingface_hub import ModelCard

    test = metrics.get("test", {})
    shown = [k for k in TABLE_METRICS if k in test]
    origin = f", fine-tuned from `{manifest['from_model']}`" if manifest.get("from_model") else ""
    card = ModelCard.from_template(
        card_data(model_name, manifest, test), template_str=TEMPLATE,
        title=model_name, encoder=manifest.get("encoder_model"),
        decoder=manifest.get("decoder_model"), origin=origin,
        dataset_name=dataset_of(manifest)[1], source=manifest.get("source"),
        split=manifest.get("split"),
        data_at=f", from `{manifest['data']}`" if manifest.get("source") != "hub" else "",
        image_size="×".join(str(s) for s in manifest.get("image_size", [])),
        max_length=manifest.get("max_length"),
        truncated=(f"; {manifest['captions_truncated']:,} longer captions were cut"
                   if manifest.get("captions_truncated") else ""),
        data_rows=_data_rows(manifest), dropped=_dropped(manifest),
        settings_rows=_settings(train_args, metrics.get("train", {}), generation),
        test_images=manifest.get("rows", {}).get("test", "?"),
        metric_head=" | ".join(METRIC_IDS[k][1] for k in shown),
        metric_rule=" --- |" * len(shown),
        metric_values=" | ".join(f"{test[k]:.4f}" for k in shown),
        snippet=snippet(model_ref), model_ref=model_ref)
    return str(card)


def card_for(output_dir, model_ref=None, model_name=None):
    """The card for a finished train.py output directory, from the files train.py wrote
    there (metrics.json, train_args.json, generation_config.json)."""
    import json
    import os

    def read(name):
        path = os.path.join(output_dir, name)
        return json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else {}

    metrics, train_args = read("metrics.json"), read("train_args.json")
    model_ref = model_ref or output_dir
    model_name = model_name or os.path.basename(os.path.abspath(model_ref.rstrip("/")))
    return render(model_ref, model_name, metrics.get("data", {}), train_args, metrics,
                  read("generation_config.json"))


def write_card(output_dir):
    """README.md in `output_dir`, its snippet loading the directory as train.py was given it."""
    text = card_for(output_dir)
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text
