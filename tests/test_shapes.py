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
    # The truth is the first reference: the second one differs, and a caption matching it
    # scores nothing for the attributes where it does.
    refs = ["a red circle in the top left", "A blue square sits in the center."]
    rows = [{"caption": "there is a red circle in the top left.", "references": refs},
            {"caption": "a red square in the top left", "references": refs},
            {"caption": "a red circle in the bottom right", "references": refs},
            {"caption": "a circle", "references": refs},
            {"caption": "a blue square in the center", "references": refs}]
    acc = attribute_accuracy(rows)
    assert acc == {"color": 0.6, "shape": 0.6, "position": 0.4, "all": 0.2}


def test_an_attribute_nobody_can_read_is_never_right():
    """A reference that names two colours and a caption that names none both read as None:
    that must count as wrong, not as a match."""
    rows = [{"caption": "a circle in the top left",
             "references": ["a red blue circle in the top left"]}]
    assert attribute_accuracy(rows) == {"color": 0.0, "shape": 1.0, "position": 1.0,
                                        "all": 0.0}
