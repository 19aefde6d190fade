"""Caption metrics, computed the way the COCO caption evaluation (coco-caption/pycocoevalcap) does.
metrics.py (the command line) and train.py both score through compute_caption_metrics here.

    compute_caption_metrics(predictions, references) -> {"bleu1".."bleu4", "meteor", "rougeL",
                                                        "rouge2", "cider"}

Every prediction is scored against *all* references of its image. All sentences are first
PTB-tokenised (lower-cased, punctuation removed) in a single Java start, then BLEU-1..4,
METEOR, ROUGE-L and CIDEr-D come from pycocoevalcap itself and ROUGE-2 from rouge_score.
Scores are fractions in [0, 1] except CIDEr, which is on its usual 0-10 scale.

Without Java a Python tokeniser that follows the PTB tokeniser's rules stands in and METEOR
is left out, with one warning line. SPICE needs a download and is never computed.

Environment: CAPTIONING_SKIP_METEOR=1 leaves METEOR out even where Java is installed, with
one warning line; everything else is scored as usual (the PTB tokeniser still runs in Java).
METEOR's Java process takes ~7 s and up to 2 GB to start, once per Python process, which
dominates short runs (a smoke test of train.py, the test suite's resume and SCST runs, whose
checks don't involve METEOR). train.py refuses --metric_for_best_model meteor under it.
"""

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile


# What pycocoevalcap's PTBTokenizer drops after tokenising.
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                ".", "?", "!", ",", ":", "-", "--", "...", ";"}
METRIC_NAMES = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rougeL", "rouge2", "cider")
# The ones tables and summaries show.
TABLE_METRICS = ("bleu1", "bleu4", "meteor", "rougeL", "rouge2", "cider")


def java_available():
    return shutil.which("java") is not None


SKIP_METEOR_ENV = "CAPTIONING_SKIP_METEOR"


def meteor_skipped():
    """True when the environment asks to leave METEOR out (CAPTIONING_SKIP_METEOR=1)."""
    return os.environ.get(SKIP_METEOR_ENV, "") == "1"


def _pycocoevalcap_dir(sub):
    import pycocoevalcap.bleu.bleu as anchor  # pycocoevalcap is a namespace package: no __file__

    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(anchor.__file__))), sub)


def _ptb_tokenize_java(sentences):
    """One Java start for the whole list; the temp file goes to the system temp dir, not
    into site-packages as pycocoevalcap's own wrapper does."""
    jar = os.path.join(_pycocoevalcap_dir("tokenizer"), "stanford-corenlp-3.4.1.jar")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write("\n".join(s.replace("\n", " ") for s in sentences))
        path = f.name
    try:
        out = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
                              "-preserveLines", "-lowerCase", path],
                             check=True, capture_output=True).stdout.decode("utf-8")
    finally:
        os.remove(path)
    lines = out.split("\n")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)
            for line, _ in zip(lines, sentences)] + [""] * (len(sentences) - len(lines))


_CONTRACTION = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_PUNCT = re.compile(r"(\.\.\.|--|[?!,:;\"`])")
_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "{": " -lcb- ", "}": " -rcb- ", "[": " -lsb- ",
             "]": " -rsb- "}


def _ptb_tokenize_python(sentences):
    """The PTB rules that matter for captions: lower-case, split clitics (don't -> do n't,
    dog's -> dog 's), split off punctuation, then drop it as pycocoevalcap does."""
    out = []
    for s in sentences:
        s = _CONTRACTION.sub(r"\1 \2", s.lower().replace("\n", " "))
        s = _PUNCT.sub(r" \1 ", s)
        for bracket, token in _BRACKETS.items():  # PTB keeps brackets, as -lrb- etc.
            s = s.replace(bracket, token)
        tokens = []
        for tok in s.split():
            # A trailing period ends a sentence ("dog."), but "3.5" and "u.s." keep theirs.
            if tok.endswith(".") and len(tok) > 1 and tok.count(".") == 1:
                tok = tok[:-1]
            tok = tok.strip("'") if tok not in ("'s", "'re", "'ve", "'ll", "'d", "'m") else tok
            if tok and tok not in PUNCTUATIONS:
                tokens.append(tok)
        out.append(" ".join(tokens))
    return out


def ptb_tokenize(sentences, use_java=None):
    use_java = java_available() if use_java is None else use_java
    return _ptb_tokenize_java(sentences) if use_java else _ptb_tokenize_python(sentences)


_METEOR = None


def _meteor(gts, res):
    """pycocoevalcap's METEOR. Its Java process takes ~7 s to load the paraphrase tables, so
    one process is kept for the life of this Python process (train.py scores every epoch)."""
    global _METEOR
    from pycocoevalcap.meteor.meteor import Meteor

    if _METEOR is None or _METEOR.meteor_p.poll() is not None:
        _METEOR = Meteor()
        atexit.register(_close_meteor)
    return float(_METEOR.compute_score(gts, res)[0])


def _close_meteor():
    global _METEOR
    if _METEOR is not None:
        _METEOR.meteor_p.stdin.close()
        _METEOR.meteor_p.kill()
        _METEOR.meteor_p.wait()
        _METEOR = None


def _rouge2(predictions, references):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=False)
    best = [max(scorer.score(ref, pred)["rouge2"].fmeasure for ref in refs) if refs else 0.0
            for pred, refs in zip(predictions, references)]
    return sum(best) / len(best)


def mostly_non_ascii(references):
    flat = [r for refs in references for r in refs]
    return sum(not r.isascii() for r in flat) > len(flat) / 2


def compute_caption_metrics(predictions, references, use_java=None):
    """Score predictions[i] against every string in references[i].

    CIDEr's document frequencies come from the references of the set being scored, exactly
    as in coco-caption: CIDEr on 10 images is not CIDEr on 5,000, so compare numbers only
    across the same evaluation set.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("nothing to score: no predictions")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every prediction needs at least one reference")
    why = "java not found" if use_java is None else "asked not to use java"
    use_java = java_available() if use_java is None else use_java
    if mostly_non_ascii(references):
        print("metrics: most references are not ASCII text; the PTB tokeniser behind BLEU, "
              "METEOR and CIDEr is English-only, so these scores tokenise such text naively "
              "and are not comparable with English COCO scores", file=sys.stderr)
    if not use_java:
        print(f"metrics: {why}, using the Python PTB tokeniser and leaving out METEOR",
              file=sys.stderr)
    elif meteor_skipped():
        print(f"metrics: {SKIP_METEOR_ENV}=1, leaving out METEOR", file=sys.stderr)

    flat = list(predictions) + [r for refs in references for r in refs]
    tokens = ptb_tokenize(flat, use_java)
    res, gts, pos = {}, {}, len(predictions)
    for i, refs in enumerate(references):
        res[i] = [tokens[i]]
        gts[i] = tokens[pos:pos + len(refs)]
        pos += len(refs)

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    if use_java and not meteor_skipped():
        scores["meteor"] = _meteor(gts, res)
    # pycocoevalcap's ROUGE-L divides by the hypothesis length, so an empty caption would
    # raise ZeroDivisionError; its score is 0 by definition.
    rouge = Rouge()
    rouge_l = [rouge.calc_score(res[i], gts[i]) if res[i][0] else 0.0 for i in res]
    scores["rougeL"] = float(sum(rouge_l) / len(rouge_l))
    scores["rouge2"] = _rouge2(list(predictions), [list(r) for r in references])
    scores["cider"] = float(Cider().compute_score(gts, res)[0])
    return scores


def format_table(scores):
    return "\n".join(f"{name:<8} {scores[name]:.4f}" for name in METRIC_NAMES if name in scores)
