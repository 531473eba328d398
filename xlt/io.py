"""The ground floor of file output: atomic writes and run-report merging (imports nothing of xlt).

Every file xlt writes that a later step reads (state, reports, held-out splits, model folders) goes through
here, so a crash leaves either the old file or the new one, never half of either.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any


def atomic_write_text(path: str, text: str) -> None:
    """Write to a uniquely named temporary file in the same folder, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False))


def atomic_write_jsonl(path: str, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def atomic_save_dir(save_fn, final_dir: str) -> None:
    """Call ``save_fn(tmp_dir)`` then swap the folder into place, so ``final_dir`` is never half written."""
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    try:
        save_fn(tmp)
        old = None
        if os.path.exists(final_dir):
            old = final_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final_dir, old)
        os.replace(tmp, final_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def update_report(output_dir: str, section: dict) -> dict:
    """Merge ``section`` into ``output_dir/report.json`` (recursively) and write it atomically."""
    path = os.path.join(output_dir, "report.json")
    report: dict[str, Any] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            report = json.load(f)

    def merge(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    merge(report, section)
    atomic_write_json(path, report)
    return report


SHARED_PREFIX = "../shared/data/"


def resolve_shared(path: str) -> str:
    """A held-out path as given, except that ``../shared/data/X`` reads ``$XLT_SHARED_DATA/X`` when set."""
    shared = os.environ.get("XLT_SHARED_DATA")
    if shared and path.replace("\\", "/").startswith(SHARED_PREFIX):
        return os.path.join(shared, path[len(SHARED_PREFIX):])
    return path


def wait_for(predicate: Callable[[], bool], what: str, poll_seconds: float = 2.0,
             log: Callable[[str], None] = print, log_every: float = 60.0) -> None:
    """Wait (without any collective, so no process-group timeout applies) until ``predicate()`` is true.

    Used by the non-main processes while the main one builds something long (the tokenizer stage over
    hundreds of millions of characters can outlast ``ddp_timeout``'s 30 minutes at a barrier). If the main
    process dies, the launcher ends the others.
    """
    start = last = time.monotonic()
    while not predicate():
        time.sleep(poll_seconds)
        if time.monotonic() - last >= log_every:
            last = time.monotonic()
            log(f"waiting for the main process: {what} ({last - start:.0f}s)")
