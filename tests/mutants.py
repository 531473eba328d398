"""Mutation check of the core guarantees: each documented mutant must make at least one test fail.

    python tests/mutants.py [--json] [--only NAME ...] [--check]

Each mutant is one exact text replacement in one source file (see MUTANTS and tests/README.md). For each, the
script copies the repository (without .git, runs, venvs, caches) to a temporary folder, applies the replacement
there (the checkout is never touched), runs the mutant's targeted tests in the copy, and records whether any test
failed ("killed") and which. The same targets run first on the unmutated copy ("baseline"): a mutant counts as
killed only when they pass there. ``--json`` prints one object
``{"baseline": {...}, "mutants": [{"name", "killed", "failing_tests", ...}]}``; ``--check`` only verifies that
every replacement still applies to the current source (tests/test_fixtures.py runs it). Exit status: 0 when every
mutant was killed (or, with --check, applies), 1 otherwise.

Not part of ``make test``: the targets include 2-process launches (minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_SKIP_DIRS = {".git", ".venv", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist"}


@dataclass(frozen=True)
class Mutant:
    name: str
    guarantee: str     # the README guarantee the mutant breaks
    path: str          # source file, relative to the repository root
    old: str           # exact text, present once
    new: str
    tests: tuple[str, ...]  # pytest node ids (or files) that must catch it


MUTANTS = (
    Mutant("packer_document_boundary_off_by_one",
           "packed rows: no token is predicted across a document boundary",
           "xlt/data/packing.py",
           "labels[self.starts] = IGNORE_INDEX",
           "labels[[max(s - 1, 0) for s in self.starts]] = IGNORE_INDEX",
           ("tests/test_data_packing.py::test_packed_loss_equals_per_document_losses",)),
    Mutant("schedule_integral_off_by_one_step",
           "each step holds the schedule's integral over that step (cumulative quota at the step's end)",
           "xlt/data/stream.py",
           "cumulative_ja_target((g + R) * S, total, args)",
           "cumulative_ja_target(g * S, total, args)",
           ("tests/test_data_mixture.py::test_every_schedule_is_realised_per_step_and_cumulatively",)),
    Mutant("guard_decides_per_rank",
           "the spike guard decides on all-reduced values, identically on every rank",
           "xlt/train/skip_step.py",
           "            dist.all_reduce(packed, op=dist.ReduceOp.SUM)\n            world = dist.get_world_size()\n",
           "            pass\n",
           ("tests/test_skip_step.py::test_two_processes_skip_together_when_only_rank_1_sees_the_bad_batch",)),
    Mutant("new_rows_share_base_lr",
           "new embedding rows train with lr x new_rows_lr_multiplier",
           "xlt/train/new_rows.py",
           'lr = float(group["lr"]) * self.settings.lr_multiplier',
           'lr = float(group["lr"])',
           ("tests/test_new_rows.py::test_new_rows_step_as_their_own_group_with_lr_multiplier_and_decay",)),
    Mutant("bpc_counts_bytes_as_characters",
           "bits per character divides by Unicode characters, not UTF-8 bytes",
           "xlt/eval/bpc.py",
           "chars = sum(len(t) for t in texts)",
           'chars = sum(len(t.encode("utf-8")) for t in texts)',
           ("tests/test_eval_bpc.py::test_bpc_equals_a_token_by_token_hand_computation",)),
)


def patched(m: Mutant, source: str) -> str:
    """``source`` with the mutant applied; ValueError when its text is not present exactly once."""
    n = source.count(m.old)
    if n != 1:
        raise ValueError(f"mutant {m.name}: {m.path} holds its text {n} times (expected 1): update tests/mutants.py")
    return source.replace(m.old, m.new)


def copy_repo(dest: Path) -> None:
    shutil.copytree(REPO, dest, ignore=lambda d, names: [n for n in names if n in _SKIP_DIRS or
                                                         n.endswith(".egg-info")], symlinks=True)


def run_tests(root: Path, tests: tuple[str, ...], timeout: int) -> tuple[int, list[str], float]:
    """pytest on ``tests`` inside ``root``: (exit status, failing test ids, seconds)."""
    report = root / ".mutant-junit.xml"
    env = {**os.environ, "PYTHONPATH": str(root), "CI": ""}  # a missing prerequisite skips rather than fails
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                           *tests], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    failing = []
    if report.is_file():
        for case in ET.parse(report).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failing.append(f"{case.get('classname')}::{case.get('name')}")
        report.unlink()
    if proc.returncode not in (0, 1) and not failing:
        failing.append(f"pytest exited {proc.returncode}: {(proc.stdout + proc.stderr).strip()[-300:]}")
    return proc.returncode, failing, seconds


def run_mutant(m: Mutant, root: Path, timeout: int) -> dict:
    src = root / m.path
    original = src.read_text(encoding="utf-8")
    src.write_text(patched(m, original), encoding="utf-8")
    try:
        rc, failing, seconds = run_tests(root, m.tests, timeout)
    finally:
        src.write_text(original, encoding="utf-8")
    return {"name": m.name, "killed": rc != 0 and bool(failing), "failing_tests": failing,
            "guarantee": m.guarantee, "file": m.path, "tests": list(m.tests), "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--only", nargs="+", choices=[m.name for m in MUTANTS], help="run only these mutants")
    ap.add_argument("--check", action="store_true", help="only check that every mutant still applies")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per pytest run")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.check:
        for m in chosen:
            patched(m, (REPO / m.path).read_text(encoding="utf-8"))
        print(json.dumps({"mutants": [{"name": m.name, "applies": True} for m in chosen]}))
        return 0
    with tempfile.TemporaryDirectory(prefix="xlt-mutants-") as tmp:
        root = Path(tmp) / "repo"
        copy_repo(root)
        for m in chosen:  # fail early and clearly when a mutant no longer applies
            patched(m, (root / m.path).read_text(encoding="utf-8"))
        targets = tuple(t for m in chosen for t in m.tests)
        rc, failing, seconds = run_tests(root, targets, args.timeout)
        baseline = {"passed": rc == 0, "failing_tests": failing, "seconds": round(seconds, 1)}
        results = [run_mutant(m, root, args.timeout) for m in chosen]
    if not baseline["passed"]:
        for r in results:
            r["killed"] = False  # a failure on the unmutated source proves nothing about the mutant
    out = {"baseline": baseline, "mutants": results}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"baseline: {'passed' if baseline['passed'] else 'FAILED ' + ', '.join(failing)} ({seconds:.0f}s)")
        for r in results:
            print(f"{r['name']:40s} {'killed' if r['killed'] else 'SURVIVED':8s} {r['seconds']:6.0f}s  "
                  f"{', '.join(r['failing_tests']) or '-'}")
    return 0 if baseline["passed"] and all(r["killed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
