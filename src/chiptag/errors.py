"""chiptag's own error type: every expected failure becomes one clear line for the user."""


class ChiptagError(Exception):
    """An expected failure (bad config, bad data, missing weights). The CLI prints it without a traceback."""
