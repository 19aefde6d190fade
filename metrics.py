"""Score caption predictions with the COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L,
ROUGE-2 and CIDEr-D, computed the way coco-caption/pycocoevalcap does (captioning/scoring.py).

    python metrics.py --predictions results.json --annotations captions_val2014.json
    python metrics.py --predictions test_results_coco.json --annotations my_images/metadata.jsonl

Every prediction is scored against *all* references of its image. The references may be a
COCO captions json, a Karpathy split json, or an imagefolder metadata.jsonl / metadata.csv.
As a module it gives the scripts `compute_caption_metrics(predictions, references)`.
"""

import argparse
import json
import sys

from captioning.scoring import (METRIC_NAMES, TABLE_METRICS, compute_caption_metrics,  # noqa: F401
                                format_table, java_available, ptb_tokenize)
from captioning.sources import references_by_image_id


def load_results_and_references(predictions_path, annotations_path, caption_column=None):
    """A COCO results file ([{image_id, caption}]) and the references (COCO captions json,
    Karpathy json, or imagefolder metadata.jsonl/.csv) -> two lists."""
    with open(predictions_path, encoding="utf-8") as f:
        results = json.load(f)
    refs = references_by_image_id(annotations_path, caption_column)
    ids = [r["image_id"] for r in results]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"{predictions_path}: duplicate image ids in results, e.g. {dup}")
    missing = [i for i in ids if i not in refs]
    if missing:
        raise ValueError(f"{predictions_path}: {len(missing)} image ids are not in "
                         f"{annotations_path}, e.g. {missing[:5]}")
    return [r["caption"] for r in results], [refs[i] for i in ids]


def main(argv=None):
    from captioning.cli import HelpFormatter, error_exit

    parser = argparse.ArgumentParser(
        description="Score a COCO caption results file with BLEU-1..4, METEOR, ROUGE-L, "
                    "ROUGE-2 and CIDEr.",
        formatter_class=HelpFormatter)
    parser.add_argument("--predictions", required=True,
                        help='results JSON: [{"image_id": int, "caption": str}, ...]')
    parser.add_argument("--annotations", required=True,
                        help="the references: a COCO captions JSON (e.g. annotations/"
                             "captions_val2014.json), a Karpathy split JSON, an imagefolder "
                             "metadata.jsonl / metadata.csv, or train.py's "
                             "test_predictions.json")
    parser.add_argument("--caption_column", default=None,
                        help="with a metadata.jsonl/.csv: the caption column (default: the first "
                             "of caption, captions, text, sentences)")
    parser.add_argument("--out", default=None, help="also write the scores to this JSON file")
    args = parser.parse_args(argv)
    try:
        predictions, references = load_results_and_references(args.predictions, args.annotations,
                                                              args.caption_column)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return error_exit("metrics.py", e)
    scores = compute_caption_metrics(predictions, references)
    print(f"{len(predictions)} images")
    print(format_table(scores))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(scores, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
