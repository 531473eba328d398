"""The ground floor of progress lines: ``[xlt cpt] message``, flushed at once (imports nothing of xlt).

Progress goes to stdout, so that a launcher's log keeps it in order with the Trainer's own lines; a command whose
stdout carries a result (``--json``) logs to stderr instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def logger(tag: str, stderr: bool = False) -> Callable[[str], None]:
    """A function that prints ``[tag] message`` to the stdout (or ``stderr``) of the moment and flushes."""

    def log(msg: str) -> None:
        print(f"[{tag}] {msg}", file=sys.stderr if stderr else sys.stdout, flush=True)

    return log
