"""train.py under real failures: SIGKILL mid-epoch then --resume, half-written checkpoints,
strict checkpoint loads, torchrun with 2 processes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train
from captioning.checkpoints import find_resume_checkpoint
from captioning.modeling import build_model, load_model_strict, load_tokenizer
from conftest import NO_METEOR, ROOT, TINY_SIZE, run_until_file_then_sigkill

pytestmark = pytest.mark.slow


NO_METEOR_ENV = {**os.environ, **NO_METEOR}  # steps and tensors are checked, not scores


def _train_cmd(prepared, out, tmp_path, *extra):
    # Evaluation (2 validation images) at every checkpoint, as in a real run; its size is
    # not what this is about.
    return [sys.executable, os.path.join(ROOT, "train.py"), "--data_path", prepared,
            "--output_dir", str(out), "--epochs", "3", "--batch_size", "8", "--lr", "1e-3",
            "--save_steps", "3", "--save_total_limit", "3", "--num_beams", "1",
            "--max_eval_samples", "2", "--num_preview_images", "0",
            "--runs_dir", str(tmp_path / "runs"), "--quiet", *extra]


def test_sigkill_mid_epoch_then_resume(prepared, tmp_path, capsys):
    out = tmp_path / "model"
    # 40 images / batch 8 = 5 steps an epoch; checkpoint-6 is saved one step into epoch 2.
    run_until_file_then_sigkill(_train_cmd(prepared, out, tmp_path),
                                out / "checkpoint-6" / "trainer_state.json", env=NO_METEOR_ENV)
    assert not (out / "metrics.json").exists()

    resumed_from = find_resume_checkpoint(str(out))
    assert resumed_from is not None and int(resumed_from.rsplit("-", 1)[1]) >= 6
    n_tensors = len(load_model_strict(resumed_from).state_dict())
    # Without --resume the output dir is protected (train.py's main, in this process: a
    # refusal before any training).
    capsys.readouterr()
    assert train.main(_train_cmd(prepared, out, tmp_path)[2:]) == 2
    assert "--resume" in capsys.readouterr().err
    r = subprocess.run(_train_cmd(prepared, out, tmp_path, "--resume"), capture_output=True,
                       text=True, timeout=600, env=NO_METEOR_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed weights from {resumed_from}: all {n_tensors} tensors restored" in r.stderr
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["train"]["global_step"] == 15  # the same as an uninterrupted run
    assert json.load(open(out / "checkpoint-15" / "trainer_state.json"))["global_step"] == 15


def test_strict_resume_restores_every_tensor(trained, prepared):
    """CaptionTrainer's checkpoint load restores every tensor of a real checkpoint into a
    model whose weights all differ (transformers' own loader misses the renamed ViT ones:
    tests/test_model.py::test_upstream_raw_state_dict_load_loses_vit_tensors)."""
    from transformers import Seq2SeqTrainingArguments

    from captioning.trainer import CaptionTrainer

    out, _ = trained
    ckpt = find_resume_checkpoint(out)
    want = load_model_strict(ckpt).state_dict()
    tok = load_tokenizer(prepared)
    targs = Seq2SeqTrainingArguments(output_dir=os.path.join(out, "scratch"), report_to="none",
                                     use_cpu=True)

    torch.manual_seed(123)
    model = build_model("tiny", "tiny", tok, TINY_SIZE)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    CaptionTrainer(model=model, args=targs, eval_collator=None, score=None
                   )._load_from_checkpoint(ckpt)
    got = model.state_dict()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


def test_half_written_checkpoint_is_skipped(trained, tmp_path):
    out, _ = trained
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    good = find_resume_checkpoint(str(copy))
    broken = copy / "checkpoint-999"
    shutil.copytree(good, broken)
    os.remove(broken / "trainer_state.json")  # killed before Trainer wrote its state
    assert find_resume_checkpoint(str(copy)) == str(copy / os.path.basename(good))
    with open(broken / "trainer_state.json", "w") as f:
        f.write('{"global_step": 9')  # killed while writing it
    assert find_resume_checkpoint(str(copy)) == str(copy / os.path.basename(good))
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(100)
    assert find_resume_checkpoint(str(copy)) == str(copy / os.path.basename(good))


def test_resume_without_checkpoint_is_one_line(prepared, tmp_path, capsys):
    rc = train.main(["--data_path", prepared, "--output_dir", str(tmp_path / "none"),
                     "--resume", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "no complete checkpoint" in err and len(err.strip().splitlines()) == 1


def test_torchrun_two_processes_write_outputs_once(split_runs):
    """conftest.py's `split_runs` ddp run: train.py under torchrun with 2 processes, 2 steps
    at batch 4 (with previews), shared with tests/test_training_invariants.py."""
    out = split_runs.ddp
    assert split_runs.ddp_stdout.count("test predictions written to") == 1
    events = [f for f in os.listdir(split_runs.runs / "ddp") if "tfevents" in f]
    assert len(events) == 1
    preds = json.load(open(out / "test_predictions.json"))
    assert sorted(p["image_id"] for p in preds) == sorted(set(p["image_id"] for p in preds))
    assert len(preds) == 10  # the whole test split, each image once
    m = json.load(open(out / "metrics.json"))
    assert m["train"]["global_step"] == 2 and "bleu4" in m["test"]
    load_model_strict(str(out))
