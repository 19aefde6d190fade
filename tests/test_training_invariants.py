"""Training that stays right at scale, checked as invariants rather than counts: the same
loss and gradient norm however a batch is split, exact mid-epoch resume, evaluation under
torchrun equal to one process, a NaN stop, and the best checkpoint by a lower-is-better
metric."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, run_train

pytestmark = pytest.mark.slow


def _history(out):
    return json.load(open(os.path.join(out, "metrics.json")))["log_history"]


def _step_logs(out):
    return {e["step"]: e for e in _history(out) if "loss" in e and "step" in e}


def test_loss_invariant_to_batch_split(split_runs):
    """One effective batch of 8 images: 1 process at batch 8, batch 4 with 2 accumulation
    steps, and torchrun with 2 processes at batch 4 give the same first-step loss and
    gradient norm (to 1e-4 relative). Before the fix the second and third were 2x.
    (conftest.py's `split_runs`, shared with the sharded-evaluation test.)"""
    firsts = {name: _step_logs(d)[1] for name, d in
              (("one", split_runs.one), ("accumulated", split_runs.acc),
               ("torchrun", split_runs.ddp))}
    base = firsts["one"]
    assert 2.0 < base["loss"] < 10.0  # a per-token cross-entropy at initialisation
    for name in ("accumulated", "torchrun"):
        assert firsts[name]["loss"] == pytest.approx(base["loss"], rel=1e-4), name
        assert firsts[name]["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-4), name
    # The eval loss is on the same per-token scale as the train loss.
    eval_loss = [e["eval_loss"] for e in _history(split_runs.one) if "eval_loss" in e][0]
    assert eval_loss == pytest.approx(base["loss"], rel=0.25)


RESUME_ARGS = ("--max_steps", "12", "--save_steps", "4", "--save_total_limit", "5",
               "--lr", "1e-3", "--max_eval_samples", "2")


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
    """uninterrupted(nproc) -> the output dir of the uninterrupted 12-step run the resumed
    ones are compared with, trained once per process count: one process with 2 dataloader
    workers (the reference of both the 0- and the 2-worker resume: workers must not change
    a step), and torchrun with 2 processes at batch 4. Losses and weights are compared, not
    scores: no METEOR (conftest.NO_METEOR)."""
    runs = {}

    def get(nproc):
        if nproc not in runs:
            base = tmp_path_factory.mktemp(f"uninterrupted{nproc}")
            workers = "2" if nproc == 1 else "0"
            run_train(prepared, base / "a", base / "runs", "--batch_size", str(8 // nproc),
                      *RESUME_ARGS, "--dataloader_num_workers", workers, nproc=nproc,
                      meteor=False)
            runs[nproc] = base / "a"
        return runs[nproc]

    return get


@pytest.mark.parametrize("workers, nproc", [(0, 1), (2, 1), (0, 2)])
def test_resume_mid_epoch_is_exact(prepared, uninterrupted, tmp_path, workers, nproc):
    """40 images, 8 per step: 5 steps an epoch. Run 12 steps with a checkpoint every 4;
    resume a copy from checkpoint-8 (3 steps into epoch 2). Steps 9-12 log the same losses
    and end with the same weights as the uninterrupted run: with and without dataloader
    workers (one uninterrupted run, with 2 workers, is the reference of both), and under
    torchrun (2 processes at batch 4), where the resumed epoch must not replay epoch 1's
    order."""
    from safetensors.torch import load_file

    args = ("--batch_size", str(8 // nproc), *RESUME_ARGS,
            "--dataloader_num_workers", str(workers))
    a = uninterrupted(nproc)
    b = tmp_path / "b"
    b.mkdir()
    shutil.copytree(a / "checkpoint-8", b / "checkpoint-8")
    shutil.copy(a / "train_args.json", b / "train_args.json")
    r = run_train(prepared, b, tmp_path / "runs", *args, "--resume_from",
                  str(b / "checkpoint-8"), nproc=nproc, meteor=False)
    assert "resumed weights from" in r.stderr
    logs_a, logs_b = _step_logs(a), _step_logs(b)
    for step in range(9, 13):
        assert logs_b[step]["loss"] == pytest.approx(logs_a[step]["loss"], rel=1e-5), step
    wa = load_file(str(a / "checkpoint-12" / "model.safetensors"))
    wb = load_file(str(b / "checkpoint-12" / "model.safetensors"))
    assert set(wa) == set(wb)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-7, msg=key)


def test_torchrun_evaluation_equals_one_process(split_runs):
    """Each of 2 processes captions its own shard; rank 0 reassembles the split. The
    captions, their order and the metrics equal a one-process run's. The learning rate is
    negligible so both runs evaluate the same weights; eval batches of 3 leave ragged
    shards (10 test images: 5 + 5, batches 3 + 2). (conftest.py's `split_runs`.)"""
    one = json.load(open(split_runs.one / "test_predictions.json"))
    two = json.load(open(split_runs.ddp / "test_predictions.json"))
    assert len(one) == 10 and len({p["image_id"] for p in one}) == 10  # each image once
    assert [(p["image_id"], p["caption"]) for p in two] == [(p["image_id"], p["caption"])
                                                            for p in one]
    m1 = json.load(open(split_runs.one / "metrics.json"))
    m2 = json.load(open(split_runs.ddp / "metrics.json"))
    for split_1, split_2 in ((m1["test"], m2["test"]), (m1["validation"][-1], m2["validation"][-1])):
        assert set(split_1) == set(split_2)
        for key, value in split_1.items():
            if key == "runtime":
                continue
            assert split_2[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_non_finite_loss_stops_the_run(prepared, tmp_path, capsys):
    out = tmp_path / "model"
    rc = train.main(["--data_path", prepared, "--output_dir", str(out), "--runs_dir",
                     str(tmp_path / "runs"), "--batch_size", "8", "--lr", "1e30",
                     "--max_steps", "6", "--save_steps", "1", "--max_eval_samples", "2",
                     "--num_beams", "1", "--num_preview_images", "0", "--quiet"])
    """An absurd learning rate breaks the weights within a step or two. The run stops with
    one line naming the step, and every checkpoint left on disk holds finite weights that
    load and give a finite loss."""
    from safetensors.torch import load_file

    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("train.py: error: the ") and " at step " in err[-1]
    assert "--lr" in err[-1] and "intact" in err[-1]
    for name in os.listdir(out):
        if name.startswith("checkpoint-"):
            for key, tensor in load_file(str(out / name / "model.safetensors")).items():
                assert torch.isfinite(tensor).all(), (name, key)
                assert tensor.abs().max() < 1e6, (name, key)  # not the 1e30-sized step
    assert not (out / "metrics.json").exists()


def test_best_checkpoint_by_loss_is_the_lowest(prepared, tmp_path):
    out = tmp_path / "model"
    assert train.main(["--data_path", prepared, "--output_dir", str(out), "--runs_dir",
                       str(tmp_path / "runs"), "--epochs", "3", "--batch_size", "8",
                       "--lr", "1e-3", "--metric_for_best_model", "loss",
                       "--save_total_limit", "5", "--num_beams", "1",
                       "--num_preview_images", "0", "--logging_steps", "1", "--quiet"]) == 0
    m = json.load(open(out / "metrics.json"))
    losses = {e["step"]: e["eval_loss"] for e in m["log_history"] if "eval_loss" in e}
    assert len(losses) == 3 and len(set(losses.values())) == 3
    best_step = int(m["best_checkpoint"].rsplit("-", 1)[1])
    assert losses[best_step] == min(losses.values())


def test_gpu_bench_dry_run():
    """bench/gpu.py's whole path (trainer row, bare loop, earlier settings, FLOP count,
    captioning) on tiny shapes, so the GPU bench is known to run before a GPU is at hand."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--dry-run"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train.py path" in r.stdout and "bare loop" in r.stdout and "captioning fp32" in r.stdout
    assert "GFLOP per training sample" in r.stdout
