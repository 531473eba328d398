"""Run identity, resume points and checkpoint rotation (atomic writes live in xlt/io.py).

The Trainer writes ``checkpoint-N/`` itself; we add ``xlt_state.json`` (stream position,
accounting, spike guard) *last*, with an atomic rename, so its presence marks a complete
checkpoint. Resume picks the newest checkpoint that has it and ignores a half-written one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any, Optional

from xlt.config import XltError
from xlt.io import atomic_write_json

RUN_FILE = "xlt_run.json"
STATE_FILE = "xlt_state.json"


def fingerprint(*parts: Any, exclude: tuple[str, ...] = ()) -> dict:
    """A JSON-able description of the settings that define a run (dataclasses merged)."""
    out: dict[str, Any] = {}
    for part in parts:
        d = dataclasses.asdict(part) if dataclasses.is_dataclass(part) else dict(part)
        for k, v in d.items():
            if k not in exclude and not k.startswith("_"):
                out[k] = v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
    return json.loads(json.dumps(out, default=str))


def claim_output_dir(output_dir: str, stage: str, settings: dict) -> bool:
    """Make ``output_dir`` this run's, or refuse it. Returns True when the same run is already there.

    A directory holding a different run (another model, other data or hyper-parameters) is an
    error, so nothing there is overwritten by mistake; the same run resumes.
    """
    path = os.path.join(output_dir, RUN_FILE)
    runs: dict[str, Any] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            runs = json.load(f)
        if stage in runs:
            old = runs[stage]
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if diff:
                shown = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff[:3])
                raise XltError(f"output dir {output_dir} holds a different {stage} run ({shown}"
                               f"{', ...' if len(diff) > 3 else ''}); use another --output_dir or delete it")
            return True
    elif os.path.isdir(output_dir) and any(not n.startswith(".") for n in os.listdir(output_dir)):
        raise XltError(f"output dir {output_dir} is not empty and holds no xlt run; use another --output_dir")
    runs[stage] = settings
    atomic_write_json(path, runs)
    return False


_CKPT = re.compile(r"^checkpoint-(\d+)$")


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The newest ``checkpoint-N`` that holds ``xlt_state.json`` (written last), or None."""
    if not os.path.isdir(output_dir):
        return None
    best = None
    for name in os.listdir(output_dir):
        m = _CKPT.match(name)
        if m and os.path.isfile(os.path.join(output_dir, name, STATE_FILE)):
            if best is None or int(m.group(1)) > best[0]:
                best = (int(m.group(1)), name)
    return os.path.join(output_dir, best[1]) if best else None


def last_trainer_checkpoint(output_dir: str) -> Optional[str]:
    """The newest ``checkpoint-N`` the Trainer finished writing (its ``trainer_state.json``, written after the
    weights, optimizer and RNG states), or None. transformers' ``get_last_checkpoint`` takes the highest number
    even when a crash cut that save short."""
    if not os.path.isdir(output_dir):
        return None
    best = None
    for name in os.listdir(output_dir):
        m = _CKPT.match(name)
        if m and os.path.isfile(os.path.join(output_dir, name, "trainer_state.json")):
            if best is None or int(m.group(1)) > best[0]:
                best = (int(m.group(1)), name)
    return os.path.join(output_dir, best[1]) if best else None


def remove_checkpoints(output_dir: str) -> list[str]:
    """Delete every ``checkpoint-N`` folder of a finished run (its final model kept elsewhere); returns the paths."""
    if not os.path.isdir(output_dir):
        return []
    paths = [os.path.join(output_dir, n) for n in sorted(os.listdir(output_dir)) if _CKPT.match(n)]
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    return paths


def rotate_complete_checkpoints(output_dir: str, limit: Optional[int]) -> list[str]:
    """Delete old checkpoints, keeping the newest ``limit`` complete ones (those holding ``xlt_state.json``).

    Why not the Trainer's rotation: it runs inside ``_save_checkpoint``, before ``xlt_state.json`` marks the new
    checkpoint complete, so a crash between the two leaves nothing to resume from; it also counts incomplete
    checkpoints and orders by mtime. Here only checkpoints older than the newest complete one are candidates,
    and an incomplete one is deleted only when a newer complete one exists. Returns the deleted paths.
    """
    if not limit or limit <= 0 or not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CKPT.match(name)
        if m:
            path = os.path.join(output_dir, name)
            found.append((int(m.group(1)), path, os.path.isfile(os.path.join(path, STATE_FILE))))
    found.sort()
    complete = [f for f in found if f[2]]
    if not complete:
        return []
    keep = {p for _, p, _ in complete[-limit:]}
    newest_complete = complete[-1][0]
    deleted = []
    for step, path, _ in found:
        if path not in keep and step < newest_complete:
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted
