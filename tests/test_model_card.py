"""The model card train.py writes, and what --push_to_hub sends.

Fast tier: a card rendered from a manifest and metrics made up here (front matter parsed as
the Hub parses it); the file choice of a push on a folder made up here. Slow tier: the card
in the `trained` fixture's output directory (its YAML, its metrics against metrics.json, its
usage snippet run as written) and what that run's --push_to_hub handed to HfApi.
"""

import contextlib
import io
import json
import os
import re
import shutil
from types import SimpleNamespace

import pytest
import yaml

from captioning import model_card
from captioning.publish import push_to_hub
from conftest import PUSH_REPO

MANIFEST = {"source": "coco", "split": "official", "data": "/data/coco",
            "encoder_model": "google/vit-base-patch16-224-in21k", "decoder_model": "gpt2",
            "image_size": [224, 224], "max_length": 32, "captions_truncated": 3,
            "rows": {"train": 20000, "validation": 500, "test": 500},
            "captions": {"train": 100123, "validation": 2502, "test": 2499},
            "images": {"total": {"seen": 21100, "dropped_non_rgb": 95, "dropped_unreadable": 5}}}
METRICS = {"test": {"bleu1": 0.7012345678901234, "bleu2": 0.5, "bleu3": 0.4, "bleu4": 0.3125,
                    "meteor": 0.25, "rougeL": 0.52, "rouge2": 0.3, "cider": 0.987654321,
                    "loss": 2.1, "runtime": 3.0},
           "train": {"global_step": 6250, "train_runtime": 1234.5}}
TRAIN_ARGS = {"epochs": 10, "batch_size": 32, "lr": 5e-5, "warmup_steps": 0,
              "weight_decay": 0.01, "precision": "auto", "precision_used": "bf16",
              "metric_for_best_model": "cider", "seed": 42, "gradient_accumulation_steps": 1}


def front_matter(text):
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, "no YAML front matter"
    return yaml.safe_load(match.group(1))


def model_index_metrics(meta):
    [entry] = meta["model-index"]
    [result] = entry["results"]
    return {m["name"]: m["value"] for m in result["metrics"]}, result


def test_card_front_matter_is_what_the_hub_reads():
    from huggingface_hub import ModelCard

    text = model_card.render("me/captioner", "captioner", MANIFEST, TRAIN_ARGS, METRICS,
                             {"num_beams": 3, "max_new_tokens": 32})
    meta = front_matter(text)
    assert meta["pipeline_tag"] == "image-to-text"
    assert meta["library_name"] == "transformers"
    assert "image-captioning" in meta["tags"] and meta["datasets"] == ["coco-2014"]
    values, result = model_index_metrics(meta)
    assert result["task"]["type"] == "image-to-text" and result["dataset"]["split"] == "test"
    assert values["BLEU-4"] == METRICS["test"]["bleu4"]  # exact, not rounded
    assert values["CIDEr"] == METRICS["test"]["cider"]
    assert "loss" not in json.dumps(values)
    # huggingface_hub reads its own output back into the same eval results
    card = ModelCard(text)
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == values
    # the body: data with counts, settings, metrics table, usage
    assert "| train | 20,000 | 100,123 |" in text
    assert "95 non-RGB images dropped" in text and "3 longer captions were cut" in text
    assert "| precision | bf16 |" in text and "| optimizer steps | 6250 |" in text
    assert "| 0.7012 | 0.3125 |" in text
    assert "from_pretrained('me/captioner')" in text
    assert "python app.py --model_path me/captioner" in text
    assert "python inference.py --model_path me/captioner" in text


def test_snippet_is_three_lines_after_the_imports():
    code = model_card.snippet("some/dir").split("\n\n")
    assert len(code) == 2 and len(code[1].splitlines()) == 3


def test_push_sends_the_top_level_files_and_the_given_card(tmp_path):
    for name in ("config.json", "model.safetensors", "README.md", "training_args.bin"):
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "optimizer.pt").write_text("x")
    calls = []
    api = SimpleNamespace(create_repo=lambda repo_id, **kw: calls.append(("repo", repo_id)),
                          create_commit=lambda repo_id, ops, **kw: calls.append(("commit", ops)))
    push_to_hub(str(tmp_path), "me/m", "the card", api=api)
    assert calls[0] == ("repo", "me/m")
    ops = {op.path_in_repo: op for op in calls[1][1]}
    assert sorted(ops) == ["README.md", "config.json", "model.safetensors"]
    assert ops["README.md"].path_or_fileobj == b"the card"


# ----------------------------------------------------------------------------- slow tier

@pytest.mark.slow
def test_trained_model_has_a_card_whose_snippet_runs(trained, shapes_coco, tmp_path,
                                                     monkeypatch):
    out, _ = trained
    text = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    meta = front_matter(text)
    assert meta["pipeline_tag"] == "image-to-text" and meta["library_name"] == "transformers"
    test = json.load(open(os.path.join(out, "metrics.json")))["test"]
    values, _ = model_index_metrics(meta)
    assert values == {model_card.METRIC_IDS[k][1]: test[k] for k in model_card.METRIC_NAMES}
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert f"from_pretrained({out!r})" in snippet  # the directory, as train.py was given it
    shutil.copy(os.path.join(shapes_coco, "val2014", "COCO_val2014_000000500000.jpg"),
                tmp_path / "photo.jpg")
    # Run as written, in this process (a fresh interpreter would spend most of its time
    # importing transformers), from a folder holding the photo.jpg it names.
    monkeypatch.chdir(tmp_path)
    out_buf = io.StringIO()
    with contextlib.redirect_stdout(out_buf):
        exec(compile(snippet, "model-card-snippet", "exec"), {"__name__": "__main__"})
    caption = out_buf.getvalue().strip()
    assert caption and len(caption.splitlines()) == 1 and re.search(r"[a-z]", caption)


@pytest.mark.slow
def test_push_to_hub_sends_model_tokenizer_processor_and_card_not_checkpoints(trained, pushed):
    out, _ = trained
    owner, name = PUSH_REPO.split("/")
    # the repo was created through huggingface_hub's own call (FakeHub saw its request)
    assert [(c["organization"], c["name"], c.get("type")) for c in pushed["created"]] == [
        (owner, name, "model")]
    assert pushed["created"][0].get("visibility") != "private"  # no --hub_private
    sent = pushed["operations"]
    for name in ("config.json", "generation_config.json", "model.safetensors",
                 "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "README.md", "metrics.json"):
        assert name in sent, name
    assert any(n.startswith("checkpoint-") for n in os.listdir(out))  # there were some to skip
    assert not any("checkpoint-" in name or "/" in name for name in sent)
    assert "training_args.bin" not in sent
    card = sent["README.md"].path_or_fileobj.decode()
    assert f"from_pretrained({PUSH_REPO!r})" in card and out not in card
    assert sent["model.safetensors"].upload_info.size == os.path.getsize(
        os.path.join(out, "model.safetensors"))
