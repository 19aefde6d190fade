"""The full-size rehearsal (`make rehearse`, run by CI after `make test`): the real
architectures, saved the way the Hub saves them, through every script on this CPU.

- ViT-B/16 at 224 px (86M parameters, with its pooler), with preprocessor_config.json;
- GPT-2 124M with its 50,257-row embeddings, vocab.json/merges.txt and no pad token;
- random weights (no network here).

dataloader.py -> train.py (3 steps at batch 8) -> inference.py -> the model-card snippet.
Prints peak RSS and seconds per training step, and asserts peak RSS under 8 GB.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.rehearsal

GB = 2**30


def gpt2_shaped_tokenizer_files(folder):
    """vocab.json/merges.txt with GPT-2's 50,257 entries: the 256 byte symbols, 50,000
    two-symbol merges (letters and the space marker first) and <|endoftext|> last."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    first = [c for c in "Ġetaoinsrhldcumfpgwybvk" if c in symbols]
    order = first + [c for c in symbols if c not in first]
    merges = [(a, b) for a in order for b in order][:50000]
    vocab = {s: i for i, s in enumerate(symbols)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    assert len(vocab) == 50257
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")


@pytest.fixture(scope="module")
def hub_full_size(tmp_path_factory):
    from transformers import (AutoTokenizer, GPT2Config, GPT2LMHeadModel, ViTConfig,
                              ViTImageProcessor, ViTModel)

    base = tmp_path_factory.mktemp("hub_full")
    vit, gpt = str(base / "vit-base-patch16-224-in21k"), str(base / "gpt2")
    ViTModel(ViTConfig()).save_pretrained(vit)  # 224 px, 16 px patches, 768 wide, 12 layers
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(vit)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(gpt)  # 124M, 50,257 tokens
    gpt2_shaped_tokenizer_files(gpt)
    tok = AutoTokenizer.from_pretrained(gpt)
    assert len(tok) == 50257 and tok.pad_token is None  # like the real gpt2
    return vit, gpt


def _peak_rss(script, *args, cwd):
    """Run a script to completion; -> (stdout, peak RSS in bytes of that process)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0, err[-3000:]
    return out, usage.ru_maxrss * 1024


def test_full_size_rehearsal(hub_full_size, tmp_path):
    vit, gpt = hub_full_size
    out, rss_prep = _peak_rss(
        "dataloader.py", "--source", "shapes", "--coco_dir", "coco", "--shapes_train", "30",
        "--shapes_val", "20", "--limit_data", "16", "--val_size", "4", "--test_size", "4",
        "--encoder_model", vit, "--decoder_model", gpt, "--save_path", "data", "--quiet",
        cwd=tmp_path)
    steps = 3
    out, rss_train = _peak_rss(
        "train.py", "--data_path", "data", "--output_dir", "model", "--max_steps", str(steps),
        "--batch_size", "8", "--save_steps", str(steps), "--num_beams", "1",
        "--eval_batch_size", "4", "--num_preview_images", "0",
        "--quiet", cwd=tmp_path)
    metrics = json.load(open(tmp_path / "model" / "metrics.json"))
    evals = sum(e.get("eval_runtime", 0) for e in metrics["log_history"])
    per_step = (metrics["train"]["train_runtime"] - evals) / steps
    image = str(tmp_path / "coco" / "val2014" / "COCO_val2014_000000500000.jpg")
    out, rss_infer = _peak_rss("inference.py", "--image_path", image, "--model_path", "model",
                               "--max_new_tokens", "8", cwd=tmp_path)
    assert len(out.strip().splitlines()) == 1

    snippet = ("from transformers import VisionEncoderDecoderModel, AutoTokenizer, "
               "AutoImageProcessor\nfrom PIL import Image\n"
               "model = VisionEncoderDecoderModel.from_pretrained('model')\n"
               "tokenizer = AutoTokenizer.from_pretrained('model')\n"
               "processor = AutoImageProcessor.from_pretrained('model')\n"
               f"pixels = processor(images=Image.open({image!r}), return_tensors='pt').pixel_values\n"
               "ids = model.generate(pixel_values=pixels, max_new_tokens=8)\n"
               "print(repr(tokenizer.decode(ids[0], skip_special_tokens=True)))\n")
    r = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

    report = (f"full-size rehearsal: peak RSS dataloader {rss_prep / GB:.2f} GB, train "
              f"{rss_train / GB:.2f} GB, inference {rss_infer / GB:.2f} GB; "
              f"{per_step:.1f} s per training step at batch 8 (fp32, CPU)")
    print("\n" + report)
    with open(os.path.join(ROOT, "rehearsal.txt"), "w") as f:
        f.write(report + "\n")
    assert max(rss_prep, rss_train, rss_infer) < 8 * GB
