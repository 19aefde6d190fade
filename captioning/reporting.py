"""What train.py shows people, besides the numbers: captioned preview images in TensorBoard
at every evaluation, the test predictions as JSON, and a loss curve PNG and a metrics table
in the output directory for those who don't run TensorBoard."""

import os
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from transformers.integrations import TensorBoardCallback

from .scoring import TABLE_METRICS

from .store import write_json


def _font(size):
    try:
        return ImageFont.load_default(size=size)  # scalable where Pillow has FreeType
    except TypeError:
        return ImageFont.load_default()


def caption_grid(pixels, predictions, references, tile=192, columns=4):
    """uint8 (N, 3, H, W) images -> one uint8 HWC grid, each image with its predicted caption
    and one reference written under it."""
    font, line_height, chars = _font(12), 15, max(16, tile // 7)
    blocks = []
    for img, pred, ref in zip(pixels, predictions, references):
        lines = ([(line, (0, 0, 0)) for line in textwrap.wrap(f"pred: {pred or '(empty)'}", chars)]
                 + [(line, (90, 90, 90)) for line in textwrap.wrap(f"ref: {ref}", chars)])
        blocks.append((img, lines))
    text_height = line_height * max(len(lines) for _, lines in blocks) + 8
    rows = -(-len(blocks) // columns)
    grid = Image.new("RGB", (columns * tile, rows * (tile + text_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, lines) in enumerate(blocks):
        x, y = (i % columns) * tile, (i // columns) * (tile + text_height)
        picture = Image.fromarray(np.asarray(img).transpose(1, 2, 0))
        grid.paste(picture.resize((tile, tile), Image.Resampling.BILINEAR), (x, y))
        for j, (line, color) in enumerate(lines):
            draw.text((x + 4, y + tile + 4 + j * line_height), line, fill=color, font=font)
    return np.asarray(grid)


def preview_markdown(predictions, references):
    rows = ["| # | prediction | reference |", "| --- | --- | --- |"]
    rows += [f"| {i} | {p or '(empty)'} | {r} |"
             for i, (p, r) in enumerate(zip(predictions, references))]
    return "\n".join(rows)


class PreviewWriter:
    """At each evaluation, log the same N validation images with the captions that evaluation
    just generated for them (no extra generate call): over epochs, the captions improve.
    Called by CaptionTrainer as on_predictions(prefix, predictions, step)."""

    def __init__(self, tb_writer, pixels, references):
        self.tb_writer = tb_writer
        self.pixels = pixels
        self.references = references

    def __call__(self, prefix, predictions, step):
        if prefix != "eval" or not len(self.pixels):
            return
        predictions = predictions[:len(self.pixels)]
        grid = caption_grid(self.pixels, predictions, self.references)
        self.tb_writer.add_image("preview/captions", grid, step, dataformats="HWC")
        self.tb_writer.add_text("preview/captions", preview_markdown(predictions, self.references),
                                step)
        self.tb_writer.flush()


class OpenTensorBoardCallback(TensorBoardCallback):
    """transformers' TensorBoardCallback, except that it leaves the writer open when training
    ends: train.py still logs the test scores and closes it itself, so that one run writes
    one event file."""

    def on_train_end(self, args, state, control, **kwargs):
        if self.tb_writer is not None:
            self.tb_writer.flush()


def save_loss_curve(log_history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["epoch"], e["loss"]) for e in log_history if "loss" in e]
    val = [(e["epoch"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for points, label in ((train, "train loss"), (val, "validation loss")):
        if points:
            ax.plot(*zip(*points), marker="o" if label.startswith("val") else None,
                    markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy per token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def metrics_table(validation, test):
    """Per-epoch validation rows and the final test row as a Markdown table."""
    head = "| split | epoch | " + " | ".join(TABLE_METRICS) + " |"
    rows = [head, "|" + " --- |" * (len(TABLE_METRICS) + 2)]
    for entry in validation:
        rows.append(f"| validation | {entry['epoch']:g} | "
                    + " | ".join(f"{entry.get(m, float('nan')):.4f}" for m in TABLE_METRICS) + " |")
    rows.append("| test | final | "
                + " | ".join(f"{test.get(m, float('nan')):.4f}" for m in TABLE_METRICS) + " |")
    return "\n".join(rows) + "\n"


def write_reports(output_dir, log_history, validation, test):
    save_loss_curve(log_history, os.path.join(output_dir, "loss_curve.png"))
    with open(os.path.join(output_dir, "metrics.md"), "w") as f:
        f.write(metrics_table(validation, test))


def write_predictions(output_dir, dataset, predictions, prefix="test"):
    """<prefix>_predictions.json (image, caption, references) and <prefix>_results_coco.json
    (COCO's results format, for metrics.py), in split order."""
    rows = [{"image_id": int(i), "file_name": f, "caption": c, "references": list(r)}
            for i, f, c, r in zip(dataset["image_id"], dataset["file_name"], predictions,
                                  dataset["captions"])]
    write_json(os.path.join(output_dir, f"{prefix}_predictions.json"), rows)
    write_json(os.path.join(output_dir, f"{prefix}_results_coco.json"),
               [{"image_id": r["image_id"], "caption": r["caption"]} for r in rows])
