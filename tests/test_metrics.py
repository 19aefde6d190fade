"""metrics.py against pycocoevalcap called directly, and without Java."""

import json

import pytest

import metrics

PREDICTIONS = ["A man riding a wave on top of a surfboard.",
               "Two dogs (brown) playing in the grass!",
               "a cat's toy, isn't it?",
               "",
               "A red double-decker bus driving down a street"]
REFERENCES = [["A man surfing a big wave.", "a surfer rides the wave",
               "Someone on a surfboard in the ocean."],
              ["Two dogs play on grass.", "Dogs running in a field"],
              ["A cat plays with a toy.", "The kitten's toy is on the floor.", "a cat",
               "cat with toy; on rug"],
              ["An empty street at night.", "a dark road"],
              ["A red bus on a street.", "double decker bus in London.",
               "A big red bus drives by", "bus", "Red bus -- city"]]

# METEOR's Java start takes ~7 s: the Java tests are in the slow tier.
java = pytest.mark.skipif(not metrics.java_available(), reason="needs java")
slow = pytest.mark.slow


def _pycocoevalcap_direct(predictions, references):
    """The official pipeline: PTBTokenizer, then Bleu(4), Meteor, Rouge, Cider."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in r] for i, r in enumerate(references)})
    res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    out = {f"bleu{n + 1}": b for n, b in enumerate(bleu)}
    out["meteor"] = Meteor().compute_score(gts, res)[0]
    out["rougeL"] = Rouge().compute_score(gts, res)[0]
    out["cider"] = Cider().compute_score(gts, res)[0]
    return out


@slow
@java
def test_equal_to_pycocoevalcap():
    # pycocoevalcap's own ROUGE-L divides by zero on an empty caption, so the direct
    # comparison uses the non-empty ones; the empty one is tested below.
    preds, refs = PREDICTIONS[:3] + PREDICTIONS[4:], REFERENCES[:3] + REFERENCES[4:]
    ours = metrics.compute_caption_metrics(preds, refs)
    theirs = _pycocoevalcap_direct(preds, refs)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key


@slow
@java
def test_empty_prediction_scores_zero_not_crash():
    scores = metrics.compute_caption_metrics(PREDICTIONS, REFERENCES)
    assert set(scores) == set(metrics.METRIC_NAMES)
    one = metrics.compute_caption_metrics([""], [["a dog"]])
    assert one["rougeL"] == 0 and one["cider"] == 0 and one["rouge2"] == 0


@slow
def test_without_java_within_one_percent(monkeypatch, capsys):
    with_java = metrics.compute_caption_metrics(PREDICTIONS, REFERENCES, use_java=True) \
        if metrics.java_available() else None
    monkeypatch.setenv("PATH", "/nonexistent")
    assert not metrics.java_available()
    scores = metrics.compute_caption_metrics(PREDICTIONS, REFERENCES)
    assert "meteor" not in scores
    assert "java not found" in capsys.readouterr().err
    if with_java:
        for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "cider"):
            assert scores[key] == pytest.approx(with_java[key], rel=0.01, abs=1e-9), key


@slow
@java
def test_skip_meteor_env_leaves_out_meteor_only(monkeypatch, capsys):
    """CAPTIONING_SKIP_METEOR=1 (captioning/scoring.py's docstring): no METEOR, one warning
    line, and every other score as with METEOR (the Java PTB tokeniser still runs)."""
    monkeypatch.delenv("CAPTIONING_SKIP_METEOR", raising=False)
    full = metrics.compute_caption_metrics(PREDICTIONS, REFERENCES)
    assert "meteor" in full
    capsys.readouterr()
    monkeypatch.setenv("CAPTIONING_SKIP_METEOR", "1")
    scores = metrics.compute_caption_metrics(PREDICTIONS, REFERENCES)
    err = capsys.readouterr().err.strip().splitlines()
    assert set(scores) == set(metrics.METRIC_NAMES) - {"meteor"}
    assert err == ["metrics: CAPTIONING_SKIP_METEOR=1, leaving out METEOR"]
    for key, value in scores.items():
        assert value == full[key], key


def test_skip_meteor_env_refuses_meteor_as_the_best_model_metric(monkeypatch, capsys):
    import train

    monkeypatch.setenv("CAPTIONING_SKIP_METEOR", "1")
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--metric_for_best_model", "meteor"])
    assert e.value.code == 2 and "CAPTIONING_SKIP_METEOR=1" in capsys.readouterr().err
    assert train.parse_args(["--metric_for_best_model", "cider"]).metric_for_best_model == "cider"


def test_all_references_count():
    """A caption that matches the *second* reference is perfect; an earlier take scored each
    prediction against one reference only."""
    preds = ["a red circle in the top left", "a blue square in the center"]
    refs = [["there is a red circle", "a red circle in the top left"],
            ["the center has a blue square", "a blue square in the center"]]
    s = metrics.compute_caption_metrics(preds, refs, use_java=False)
    assert s["bleu4"] == pytest.approx(1.0, abs=1e-6) and s["rougeL"] == pytest.approx(1.0)
    assert s["rouge2"] == pytest.approx(1.0)
    worse = metrics.compute_caption_metrics(preds, [[r[0]] for r in refs], use_java=False)
    assert worse["bleu4"] < 0.5


def test_python_tokenizer_follows_ptb_rules():
    assert metrics.ptb_tokenize(["A Dog's toy, isn't it?"], use_java=False) == ["a dog 's toy is n't it"]
    assert metrics.ptb_tokenize(["Two dogs (brown)."], use_java=False) == ["two dogs -lrb- brown -rrb-"]


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        metrics.compute_caption_metrics(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        metrics.compute_caption_metrics(["a"], [[]])


def test_cli_scores_results_file(tmp_path, capsys):
    ann = {"images": [{"id": 1}, {"id": 2}], "annotations": [
        {"image_id": 1, "caption": "a red circle"}, {"image_id": 1, "caption": "red circle"},
        {"image_id": 2, "caption": "a blue square"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": 1, "caption": "a red circle"},
                                                   {"image_id": 2, "caption": "a blue square"}]))
    out = tmp_path / "scores.json"
    rc = metrics.main(["--predictions", str(tmp_path / "res.json"), "--annotations",
                       str(tmp_path / "ann.json"), "--out", str(out)])
    assert rc == 0 and "bleu4" in capsys.readouterr().out
    assert json.load(open(out))["cider"] > 0
    (tmp_path / "dup.json").write_text(json.dumps([{"image_id": 1, "caption": "a"}] * 2))
    assert metrics.main(["--predictions", str(tmp_path / "dup.json"),
                         "--annotations", str(tmp_path / "ann.json")]) == 2
    (tmp_path / "bad.json").write_text(json.dumps([{"image_id": 7, "caption": "a"}]))
    assert metrics.main(["--predictions", str(tmp_path / "bad.json"),
                         "--annotations", str(tmp_path / "ann.json")]) == 2
    err = capsys.readouterr().err
    assert "duplicate" in err and "not in" in err and "Traceback" not in err
