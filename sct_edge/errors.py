"""The one exception type every bad input becomes: a one-line message that names the file and the problem.

The CLI catches it, prints `sct-edge: error: <message>` and exits non-zero without a traceback.
"""


class SctError(Exception):
    """A user-facing error: bad input, a corrupt store, a budget too small, a full disk."""


class Terminated(BaseException):
    """SIGTERM arrived while a command was working: raised where the main thread is, so the cleanup on the way
    out runs (staging files removed, a half-written store deleted). A BaseException, as KeyboardInterrupt is,
    so no `except Exception` on the way swallows it; the CLI exits 143 with one line."""


def raise_terminated() -> None:
    """A signal handler for `signals_handled_by`: turn SIGTERM into `Terminated`."""
    raise Terminated
