"""The README's commands, run as subprocesses on a tiny built-in set."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from metrics import METRIC_NAMES, compute_caption_metrics


def run(*args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_three_scripts_end_to_end(tmp_path):
    py = lambda name: os.path.join(ROOT, name)  # noqa: E731
    r = run(py("dataloader.py"), "--source", "shapes", "--coco_dir", "shapes",
            "--shapes_train", "50", "--shapes_val", "20", "--limit_data", "30",
            "--val_size", "5", "--test_size", "6", "--save_path", "processed_data",
            "--encoder_model", "tiny", "--decoder_model", "tiny", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "kept" in r.stdout
    r = run(py("train.py"), "--data_path", "processed_data", "--epochs", "1",
            "--batch_size", "8", "--lr", "1e-3", "--num_beams", "1", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    model_dir = tmp_path / "image_captioning_model"  # the default --output_dir
    test = json.load(open(model_dir / "metrics.json"))["test"]
    preds = json.load(open(model_dir / "test_predictions.json"))
    assert len(preds) == 6 and set(METRIC_NAMES) - {"meteor"} <= set(test)
    rescored = compute_caption_metrics([p["caption"] for p in preds],
                                       [p["references"] for p in preds])
    assert rescored["cider"] == pytest.approx(test["cider"], abs=1e-9)
    assert os.listdir(tmp_path / "runs")  # TensorBoard, under runs/
    image = tmp_path / "shapes" / "val2014" / "COCO_val2014_000000500000.jpg"
    r = run(py("inference.py"), "--image_path", str(image), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1  # one caption (an untrained model may say little)
    r = run(py("inference.py"), "--image_path", str(tmp_path / "missing.jpg"), cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().endswith("no such file")


@pytest.mark.parametrize("script", ["dataloader.py", "train.py", "inference.py", "metrics.py"])
def test_help_documents_every_option_and_default(script):
    r = run(os.path.join(ROOT, script), "--help", cwd=ROOT)
    assert r.returncode == 0
    # Every option in --help has help text; every optional one shows its default.
    assert r.stdout.count("\n  --") >= 3
    for line in r.stdout.split("\n  --")[1:]:
        name = line.split()[0]
        body = " ".join(line.split())
        assert len(body) > len(name) + 15, f"{script} {name} lacks help"
        required = f"--{name}" in r.stdout.split("options:")[0].replace("[--", "")
        if not required and name not in ("help", "overwrite", "quiet"):
            assert "(default:" in body, f"{script} --{name} shows no default"


def test_inference_help_does_not_import_torch():
    code = ("import sys; sys.argv=['inference.py','--help']; sys.path.insert(0, %r)\n"
            "import inference\ntry:\n    inference.main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n" % ROOT)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_shapes_with_every_default_but_limit_data(tmp_path):
    """The first command a newcomer types: the built-in set with defaults fitted to it."""
    r = run(os.path.join(ROOT, "dataloader.py"), "--source", "shapes", "--limit_data", "400",
            "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "splitting them 50% / 50%" in r.stderr
    m = json.load(open(tmp_path / "processed_data" / "manifest.json"))
    assert m["rows"]["train"] == 400 and m["encoder_model"] == "tiny"
    assert m["rows"]["validation"] + m["rows"]["test"] == 285  # 300 less every 20th (gray)
