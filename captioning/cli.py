"""What the four scripts share about being command-line programs: one help formatter, the
argument types they validate with, the one-line error exit, and the process-wide settings
they make at start (never on import)."""

import argparse
import os
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless the help already says it or the option is
    required."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.required:
            return action.help
        return super()._get_help_string(action)


def positive_int(text):
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def non_negative_int(text):
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def positive_float(text):
    """argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {value:g}")
    return value


def error_exit(script, message, code=2):
    """Print `script: error: message` on one line and return the exit code for main()."""
    first = str(message).strip().splitlines()[0] if str(message).strip() else "unknown error"
    print(f"{script}: error: {first}", file=sys.stderr)
    return code


def configure_runtime():
    """Process-wide settings the scripts make once, at start:
    - transformers' load reports and its "no torchvision, PIL backend" notice are noise for
      users of these scripts (TRANSFORMERS_VERBOSITY=warning brings them back);
    - a truncated image must fail loudly, never be padded with grey (PIL's default already,
      set here so that no other import can have changed it)."""
    from PIL import ImageFile

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def quiet_transformers():
    """Hide transformers' own "Loading weights" bars (training and download bars stay)."""
    from transformers.utils import logging

    level = os.environ.get("TRANSFORMERS_VERBOSITY", "error").upper()
    logging.set_verbosity(getattr(logging, level, logging.ERROR))
    logging.disable_progress_bar()
