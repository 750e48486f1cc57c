"""The one exception type every bad input becomes: a one-line message that names the file and the problem.

The CLI catches it, prints `sct-edge: error: <message>` and exits non-zero without a traceback.
"""


class SctError(Exception):
    """A user-facing error: bad input, a corrupt store, a budget too small, a full disk."""
