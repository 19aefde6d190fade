"""Self-critical sequence training: the CIDEr-D reward against pycocoevalcap, EOS in the
reward, the reference cache, the direction of the policy gradient, the token-weighted loss
under accumulation, and (slow) --scst with a SIGKILL and --resume, and under torchrun."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from captioning import scst, shapes
from captioning.cider import CACHE_NAME, CiderD, document_frequency, ngram_counts
from captioning.modeling import through_first_eos
from conftest import NO_METEOR, ROOT, free_port, run_until_file_then_sigkill


def _corpus(seed=0, images=60):
    """Tokenised shapes-style references (1-5 per image) and varied candidates: copies of a
    reference, shuffled and repeated words (clipping), unseen words, empty, the EOS word."""
    rng = random.Random(seed)
    sentences = scst.reward_texts(
        [t.format(color=c, shape=s, pos=p) for t in shapes.TEMPLATES for c in shapes.COLORS
         for s in shapes.SHAPES for p in shapes.POSITIONS], [True] * 540)
    refs = [[rng.choice(sentences) for _ in range(rng.randint(1, 5))] for _ in range(images)]

    def candidate(i):
        kind = rng.random()
        if kind < 0.1:
            return ""
        if kind < 0.3:
            return rng.choice(refs[i])
        words = rng.choice(sentences).split() + ["zebra"] * (kind > 0.9)
        rng.shuffle(words)
        return " ".join(words[:rng.randint(1, len(words))] * rng.randint(1, 3))

    return refs, candidate


def test_cider_d_equals_pycocoevalcap_on_shared_document_frequencies():
    """Per-image CIDEr-D of 3 candidate rounds over 60 images, against pycocoevalcap's
    CiderScorer counting the same references' document frequencies (sigma 6, clipping,
    length penalty, x10), to 1e-6."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    refs, candidate = _corpus()
    ours = CiderD(document_frequency(refs), len(refs))
    tables = [ours.reference_table(r) for r in refs]
    for _ in range(3):  # each round: the same references, so the same frequencies
        hyps = [candidate(i) for i in range(len(refs))]
        scorer = CiderScorer(n=4, sigma=6.0)
        for hyp, image_refs in zip(hyps, refs):
            scorer += (hyp, image_refs)
        _, theirs = scorer.compute_score()
        got = [ours.score(h, t) for h, t in zip(hyps, tables)]
        assert max(theirs) > 1.0 and min(theirs) == 0.0  # the corpus spans the range
        np.testing.assert_allclose(got, theirs, rtol=0, atol=1e-6)
    # Candidates' unseen n-grams ("zebra") were scored; the idf table is the references'
    # n-grams, computed once, and scoring does not add to it.
    assert any(g not in ours.df for h in hyps for g in ngram_counts(h.split()))
    assert set(ours._idf) == set(ours.df)


def _reward(tmp_path, captions, name="cache"):
    return scst.CiderReward(captions, [str(tmp_path / name)])


def test_unfinished_caption_is_rewarded_less_than_the_same_words_finished(tmp_path):
    refs = [["a red circle in the center", "a red circle sits in the center."],
            ["a blue square in the top left", "there is a blue square in the top left"],
            ["a green triangle at the bottom right", "a triangle that is green"]]
    reward = _reward(tmp_path, refs)
    words = ["a red circle in the center", "a blue square in the top left"]
    finished = reward(words, [True, True], [0, 1])
    unfinished = reward(words, [False, False], [0, 1])
    assert (finished > unfinished).all() and (unfinished > 0).all()
    # The reward text is PTB-tokenised: case and punctuation don't change it.
    assert reward(["A red circle, in the center."], [True], [0])[0] == finished[0]


def test_reference_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    refs = [["a red circle in the center"], ["a blue square in the top left", "a square"]]
    first = _reward(tmp_path, refs)
    assert os.path.isfile(tmp_path / "cache" / CACHE_NAME)
    # A second run reads the cache: no tokenising of the references.
    monkeypatch.setattr(scst, "_reference_tokens", lambda s: pytest.fail("re-tokenised"))
    second = _reward(tmp_path, refs)
    assert second.tokens == first.tokens and second.cider.df == first.cider.df
    monkeypatch.undo()
    # Other references: the cache is ignored and rewritten.
    third = _reward(tmp_path, refs + [["a green triangle"]])
    assert len(third.tokens) == 3
    # An unwritable data folder (here: a path under a file, which even root cannot create):
    # the cache goes to the next folder, the output directory.
    (tmp_path / "file").write_text("")
    scst.CiderReward(refs, [str(tmp_path / "file" / "data"), str(tmp_path / "out")])
    assert os.path.isfile(tmp_path / "out" / CACHE_NAME)


def test_baselines():
    rewards = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    np.testing.assert_allclose(scst.baselines(rewards, 3, "mean"),
                               [2.5, 2.0, 1.5, 25.0, 20.0, 15.0])
    np.testing.assert_allclose(scst.baselines(rewards, 3, "greedy", np.array([7.0, 8.0])),
                               [7, 7, 7, 8, 8, 8])


def test_sample_mask_keeps_tokens_through_the_first_eos():
    eos = 0
    ids = torch.tensor([[5, 6, 0, 0, 0], [5, 0, 7, 0, 0], [5, 6, 7, 8, 9]])
    mask, finished = through_first_eos(ids, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert finished.tolist() == [True, True, False]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_policy_gradient_moves_a_sample_with_its_advantage(tiny, sign):
    """One SGD step on the SCST loss: a sampled caption whose reward beats its baseline
    (advantage > 0) becomes more likely, one below it less likely."""
    model = tiny.model()
    model.eval()  # no dropout, as SCSTTrainer's scoring pass: before and after are exact
    pixels = torch.randn(1, 3, 64, 64)
    ids = torch.tensor([[10, 20, 30, tiny.tokenizer.eos_token_id]])

    mask, _ = through_first_eos(ids, tiny.tokenizer.eos_token_id)

    def log_p():
        states = model.encoder(pixel_values=pixels).last_hidden_state
        return scst.sample_log_probs(model, model, states, ids, 1, mask)

    with torch.no_grad():
        before = float(log_p().sum())
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scst.policy_loss_sum(log_p(), mask.float(), torch.tensor([sign])).backward()
    opt.step()
    with torch.no_grad():
        after = float(log_p().sum())
    assert (after - before) * sign > 1e-4, (before, after)


def _fake_sampler(pool):
    """Deterministic 'samples' that depend only on the image's encoding, so that any split
    of a batch draws the same ones: captions from `pool` (token id lists ending with EOS),
    some cut before their EOS (unfinished), padded with EOS as generate pads."""

    def sample(model, states, k, sample):
        eos, width = model.config.eos_token_id, max(len(ids) for ids in pool) + 2
        rows = []
        for s in (states[:, 0, 0].float() * 1000).floor().long().abs().tolist():
            for j in range(k):
                ids = list(pool[(s * 7 + j * 13) % len(pool)])
                if (s + j) % 3 == 0:  # unfinished: no EOS up to the length limit
                    ids = (ids[:-1] * width)[:width]
                rows.append(ids + [eos] * (width - len(ids)))
        return torch.tensor(rows)

    return sample


def _scst_trainer(tiny, tmp_path, batch, accumulation):
    from transformers import Seq2SeqTrainingArguments

    reward = scst.CiderReward([r["captions"] for r in tiny.rows[:8]], [str(tmp_path / "c")])
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path / f"o{batch}"), max_steps=1, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True,
        remove_unused_columns=False, disable_tqdm=True, seed=0)
    return scst.SCSTTrainer(
        model=tiny.model(), args=args, train_dataset=scst.SCSTView(tiny.rows[:8], seed=0),
        data_collator=scst.SCSTCollator(tiny.processor), eval_collator=None, score=None,
        processing_class=tiny.tokenizer, reward=reward, samples=3, baseline="mean")


def test_loss_is_token_weighted_over_the_effective_batch(tiny, tmp_path, monkeypatch):
    """Batch 8, and batch 4 with 2 accumulation steps, on the same samples: the same logged
    loss and gradient norm (the sampled-token count differs between the two micro-batches,
    so a per-micro-batch mean would differ). The SCST statistics are logged."""
    pool = [ids for row in tiny.rows[:8] for ids in row["caption_ids"]]
    monkeypatch.setattr(scst, "generate_from_encoding", _fake_sampler(pool))
    logs = []
    for batch, accumulation in ((8, 1), (4, 2)):
        trainer = _scst_trainer(tiny, tmp_path, batch, accumulation)
        trainer.train()
        logs.append(next(e for e in trainer.state.log_history if "loss" in e))
    one, split = logs
    assert one["loss"] == pytest.approx(split["loss"], rel=1e-5)
    assert one["grad_norm"] == pytest.approx(split["grad_norm"], rel=1e-4)
    assert one["grad_norm"] > 0
    for key in ("scst_reward", "scst_baseline", "scst_sample_length", "scst_eos_share"):
        assert one[key] == pytest.approx(split[key], rel=1e-6), key
    assert 0 < one["scst_eos_share"] < 1 and one["scst_reward"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--scst"], "--scst needs --init_from"),
    (["--scst", "--init_from", "m", "--scst_samples", "1"], "at least 2"),
    (["--scst", "--init_from", "m", "--metric_for_best_model", "loss"], "caption metric"),
])
def test_bad_scst_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_scst_learning_rate_default():
    assert train.parse_args(["--scst", "--init_from", "m"]).lr == 1e-5
    assert train.parse_args([]).lr == 5e-5
    assert train.parse_args(["--scst", "--init_from", "m", "--lr", "3e-4"]).lr == 3e-4
    assert train.parse_args(["--scst", "--init_from", "m", "--scst_baseline", "greedy",
                             "--scst_samples", "1"]).scst_samples == 1


# ----------------------------------------------------------------------------- slow tier

def _scst_cmd(prepared, init, out, tmp_path, *extra):
    return [os.path.join(ROOT, "train.py"), "--data_path", prepared, "--output_dir", str(out),
            "--init_from", init, "--scst", "--batch_size", "8", "--num_beams", "1",
            "--max_eval_samples", "2", "--num_preview_images", "0", "--logging_steps", "1",
            "--runs_dir", str(tmp_path / "runs"), "--quiet", *extra]


@pytest.mark.slow
def test_scst_sigkill_then_resume_finishes(prepared, trained, tmp_path):
    """--scst from the CE fixture model: SIGKILL after checkpoint-2, then --resume finishes
    all 4 steps; the log has the SCST statistics and the reward cache sits by the data."""
    init, _ = trained
    out = tmp_path / "scst"
    cmd = [sys.executable, *_scst_cmd(prepared, init, out, tmp_path, "--max_steps", "4",
                                      "--save_steps", "2", "--scst_samples", "3")]
    env = {**os.environ, **NO_METEOR}  # CIDEr is checked, METEOR not: its Java start saved
    run_until_file_then_sigkill(cmd, out / "checkpoint-2" / "trainer_state.json", env=env)
    assert not (out / "metrics.json").exists()
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed weights from" in r.stderr
    m = json.load(open(out / "metrics.json"))
    assert m["train"]["global_step"] == 4 and "cider" in m["test"]
    steps = [e for e in m["log_history"] if "scst_reward" in e]
    assert {e["step"] for e in steps} >= {3, 4}
    assert all(np.isfinite(e["loss"]) and 0 <= e["scst_eos_share"] <= 1 for e in steps)
    assert os.path.isfile(os.path.join(prepared, CACHE_NAME))
    assert json.load(open(out / "train_args.json"))["lr"] == 1e-5


@pytest.mark.slow
def test_scst_under_torchrun_two_processes(prepared, trained, tmp_path):
    """torchrun x2 with the greedy baseline: both steps log finite SCST statistics (loss,
    reward, baseline, length, EOS share in range) and the saved model is trained: its
    decoder differs from the init model's."""
    from safetensors.torch import load_file

    init, _ = trained
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **NO_METEOR}  # CIDEr is checked, not METEOR
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()),
                        *_scst_cmd(prepared, init, out, tmp_path, "--max_steps", "2",
                                   "--save_steps", "2", "--batch_size", "4",
                                   "--scst_baseline", "greedy")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("test predictions written to") == 1
    m = json.load(open(out / "metrics.json"))
    assert m["train"]["global_step"] == 2 and "cider" in m["test"]
    steps = [e for e in m["log_history"] if "scst_reward" in e]
    assert [e["step"] for e in steps] == [1, 2]
    for e in steps:
        values = [e[k] for k in ("loss", "grad_norm", "scst_reward", "scst_baseline",
                                 "scst_sample_length", "scst_eos_share")]
        assert all(np.isfinite(values)), e
        assert 0 <= e["scst_eos_share"] <= 1 and e["scst_sample_length"] >= 1
        assert e["scst_reward"] >= 0 and e["grad_norm"] > 0
    before = load_file(os.path.join(init, "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("decoder.") for k in changed), changed
