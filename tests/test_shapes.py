"""The built-in set's caption reader (captioning/shapes.py), which bench/scst_vs_ce.py uses to
say what a model got right beyond its CIDEr."""

import itertools

from captioning.shapes import (COLORS, POSITIONS, SHAPES, TEMPLATES, attribute_accuracy,
                               caption_attributes)


def test_every_template_reads_back_its_attributes():
    for template, color, shape, pos in itertools.product(TEMPLATES, COLORS, SHAPES, POSITIONS):
        caption = template.format(color=color, shape=shape, pos=pos)
        assert caption_attributes(caption) == (color, shape, pos), caption


def test_ambiguous_or_missing_attributes_read_as_none():
    assert caption_attributes("a red blue circle in the top left") == (None, "circle", "top left")
    assert caption_attributes("a thing in the top left or the bottom right") == (None, None, None)
    assert caption_attributes("") == (None, None, None)


def test_attribute_accuracy_counts_each_attribute_and_all_three():
    refs = ["a red circle in the top left", "A red circle sits in the top left."]
    rows = [{"caption": "there is a red circle in the top left.", "references": refs},
            {"caption": "a red square in the top left", "references": refs},
            {"caption": "a red circle in the bottom right", "references": refs},
            {"caption": "a circle", "references": refs}]
    acc = attribute_accuracy(rows)
    assert acc == {"color": 0.75, "shape": 0.75, "position": 0.5, "all": 0.25}
