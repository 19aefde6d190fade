"""train.py outputs, TensorBoard logs, refusals, and the Hub-shaped real path."""

import json
import os

import pytest

import dataloader
import train
from captioning.modeling import load_model_strict
from metrics import METRIC_NAMES, compute_caption_metrics

pytestmark = pytest.mark.slow


def test_outputs_load_with_the_auto_classes(trained):
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    out, _ = trained
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "generation_config.json",
            "preprocessor_config.json", "tokenizer_config.json", "metrics.json",
            "test_predictions.json", "test_results_coco.json"} <= files
    model = VisionEncoderDecoderModel.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    AutoImageProcessor.from_pretrained(out)
    gc = model.generation_config
    assert gc.decoder_start_token_id == tok.bos_token_id
    assert gc.eos_token_id == tok.eos_token_id and gc.pad_token_id == tok.eos_token_id
    assert gc.num_beams == 2
    # the data's --max_length (32, EOS included) is what generate may produce
    assert gc.max_new_tokens == json.load(open(os.path.join(out, "metrics.json")))["data"]["max_length"]


def test_metrics_json_has_epochs_and_test(trained):
    out, _ = trained
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert [round(e["epoch"]) for e in m["validation"]] == [1, 2]
    for key in METRIC_NAMES:
        assert key in m["test"] and key in m["validation"][-1]
    preds = json.load(open(os.path.join(out, "test_predictions.json")))
    assert len(preds) == 10 and all(len(p["references"]) >= 4 for p in preds)
    assert len({p["image_id"] for p in preds}) == 10  # one caption per image


def test_tensorboard_has_loss_and_eval_metrics(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = trained
    acc = EventAccumulator(run_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "eval/bleu4", "eval/cider",
            "test/bleu4"} <= tags
    assert len(acc.Scalars("train/loss")) >= 2
    assert len([f for f in os.listdir(run_dir) if "tfevents" in f]) == 1  # one run, one file


def test_tensorboard_has_captioned_previews(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = trained
    acc = EventAccumulator(run_dir, size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert "preview/captions" in acc.Tags()["images"]
    images = acc.Images("preview/captions")
    assert len(images) == 2  # one per evaluation (2 epochs)
    from PIL import Image
    import io
    grid = Image.open(io.BytesIO(images[-1].encoded_image_string))
    assert grid.width == 4 * 192 and grid.height > 2 * 192  # 8 images, 4 per row, with text
    text_tags = [t for t in acc.Tags()["tensors"] if t.startswith("preview/captions")]
    assert text_tags
    text = acc.Tensors(text_tags[0])[-1].tensor_proto.string_val[0].decode()
    assert "| prediction | reference |" in text and text.count("\n") >= 9


def test_loss_curve_and_metrics_table(trained):
    from PIL import Image

    out, _ = trained
    with Image.open(os.path.join(out, "loss_curve.png")) as img:
        assert img.size == (600, 400)
    table = open(os.path.join(out, "metrics.md")).read().splitlines()
    assert table[0].startswith("| split | epoch | bleu1") and len(table) == 2 + 2 + 1
    assert table[-1].startswith("| test | final |")


def test_metrics_cli_rescores_train_results(trained, shapes_coco, tmp_path, capsys):
    """test_results_coco.json is an official-format results file: metrics.py scores it
    against the COCO annotations to the same numbers train.py reported."""
    import metrics

    out, _ = trained
    rc = metrics.main(["--predictions", os.path.join(out, "test_results_coco.json"),
                       "--annotations", os.path.join(shapes_coco, "annotations",
                                                     "captions_val2014.json"),
                       "--out", str(tmp_path / "scores.json")])
    assert rc == 0
    rescored = json.load(open(tmp_path / "scores.json"))
    reported = json.load(open(os.path.join(out, "metrics.json")))["test"]
    for key in ("bleu4", "rougeL", "cider", "rouge2"):
        assert rescored[key] == pytest.approx(reported[key], abs=1e-6), key


def test_non_empty_output_dir_is_refused(prepared, tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "precious.bin").write_text("x")
    rc = train.main(["--data_path", prepared, "--output_dir", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err and (out / "precious.bin").exists()


@pytest.mark.parametrize("make_bad, message", [
    (lambda d: None, "does not exist"),
    (lambda d: os.makedirs(d), "was not written by dataloader.py"),
    (lambda d: (os.makedirs(d), open(os.path.join(d, "manifest.json"), "w").write("{")), "not valid JSON"),
    (lambda d: (os.makedirs(d), open(os.path.join(d, "manifest.json"), "w").write('{"format_version": 99}')), "format_version"),
])
def test_bad_data_path_gives_one_line(tmp_path, capsys, make_bad, message):
    data = str(tmp_path / "data")
    make_bad(data)
    rc = train.main(["--data_path", data, "--output_dir", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_hub_shaped_model_dirs_train_and_reload(hub_shaped_dirs, shapes_coco, tmp_path):
    """The real path with no network: from_encoder_decoder_pretrained on folders shaped like
    the Hub repos, and GPT-2's missing pad token fixed."""
    from transformers import AutoTokenizer, VisionEncoderDecoderModel

    vit_dir, gpt_dir = hub_shaped_dirs
    assert AutoTokenizer.from_pretrained(gpt_dir).pad_token is None  # like the real gpt2
    data = str(tmp_path / "data")
    assert dataloader.main(["--coco_dir", shapes_coco, "--save_path", data,
                            "--encoder_model", vit_dir, "--decoder_model", gpt_dir,
                            "--limit_data", "12", "--val_size", "4", "--test_size", "4",
                            "--num_proc", "1", "--quiet"]) == 0
    manifest = json.load(open(os.path.join(data, "manifest.json")))
    assert manifest["encoder_model"] == vit_dir and manifest["image_size"] == [32, 32]
    out = str(tmp_path / "model")
    assert train.main(["--data_path", data, "--output_dir", out, "--max_steps", "2",
                       "--batch_size", "4", "--runs_dir", str(tmp_path / "runs"),
                       "--num_beams", "1", "--quiet"]) == 0
    model = VisionEncoderDecoderModel.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert model.config.decoder.add_cross_attention and model.config.decoder.is_decoder
    assert model.generation_config.decoder_start_token_id == tok.bos_token_id


def test_final_model_is_the_best_checkpoint(trained):
    """The saved final model equals the best checkpoint in *every* tensor (Trainer's own
    best-model load misses some in transformers 5.x)."""
    import torch

    out, _ = trained
    best = json.load(open(os.path.join(out, "metrics.json")))["best_checkpoint"]
    assert best and os.path.isdir(best)
    final, ckpt = load_model_strict(out).state_dict(), load_model_strict(best).state_dict()
    assert set(final) == set(ckpt)
    assert all(torch.equal(final[k], ckpt[k]) for k in final)


def test_reported_test_metrics_rescore_from_the_predictions(trained):
    """metrics.json's test scores are those of the captions in test_predictions.json."""
    out, _ = trained
    preds = json.load(open(os.path.join(out, "test_predictions.json")))
    reported = json.load(open(os.path.join(out, "metrics.json")))["test"]
    rescored = compute_caption_metrics([p["caption"] for p in preds],
                                       [p["references"] for p in preds])
    for key in ("bleu4", "cider", "rougeL"):
        assert rescored[key] == pytest.approx(reported[key], abs=1e-9), key


@pytest.mark.upstream
def test_upstream_from_encoder_decoder_pretrained_forgets_is_decoder(hub_shaped_dirs):
    """transformers 5.24: left to build the decoder config itself, from_encoder_decoder_
    pretrained fails on GPT2Config.is_decoder. If this fails after an upgrade, transformers
    fixed it, and build_model's finished decoder_config may go. Not a regression of ours."""
    from transformers import VisionEncoderDecoderModel

    vit_dir, gpt_dir = hub_shaped_dirs
    with pytest.raises(AttributeError, match="is_decoder"):
        VisionEncoderDecoderModel.from_encoder_decoder_pretrained(vit_dir, gpt_dir)
