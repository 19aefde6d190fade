"""How long metrics.compute_caption_metrics takes on a COCO-sized evaluation: 5,000 images
with 5 references each (the Karpathy test split's shape).

    python bench/score.py [--images 5000] [--refs 5]

Captions are synthetic but COCO-like (10-word sentences from a 1,000-word vocabulary, with
punctuation and case), generated from a fixed seed. Prints the time of each stage.
"""

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import metrics  # noqa: E402


def synthetic_captions(n_images, n_refs, seed=0):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(1000)] + ["a", "the", "on", "of", "with", "in"] * 50

    def sentence():
        words = [rng.choice(vocab) for _ in range(rng.randint(7, 14))]
        return words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice([".", "", " !"])

    refs = [[sentence() for _ in range(n_refs)] for _ in range(n_images)]
    preds = [sentence() for _ in range(n_images)]
    return preds, refs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=5000, help="images to score")
    p.add_argument("--refs", type=int, default=5, help="references per image")
    args = p.parse_args(argv)
    preds, refs = synthetic_captions(args.images, args.refs)
    java = metrics.java_available()
    t0 = time.perf_counter()
    metrics.ptb_tokenize(preds + [r for rs in refs for r in rs])
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = metrics.compute_caption_metrics(preds, refs)
    total = time.perf_counter() - t0
    print(f"{args.images} images x {args.refs} references, java={'yes' if java else 'no'}")
    print(f"PTB tokenisation alone: {t_tok:.1f} s")
    print(f"compute_caption_metrics, all metrics: {total:.1f} s (target < 30 s)")
    print("scores: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
