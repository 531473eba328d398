"""The step-overhead and MFU benchmarks run and report what they claim (speed is reported, not asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]


def run_json(script: str, *args: str, env: dict | None = None) -> dict:
    """Run ``bench/SCRIPT --json ARGS``; stdout must be exactly one JSON object."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--json", *args], capture_output=True,
                         text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout[-2000:]
    return json.loads(lines[0])


def test_step_overhead_json():
    data = Path(os.environ.get("XLT_SHARED_DATA", SHARED))
    if not (data / "ja_wiki_paragraphs.jsonl").is_file():
        pytest.skip(f"shared data not found in {data}")
    r = run_json("step_overhead.py", "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                 "--seq-len", "32", "--batch", "2", "--steps", "4", "--warmup", "1", "--rounds", "1",
                 env={"XLT_SHARED_DATA": str(data)})
    for key in ("overhead_ratio", "overhead_ratio_of_medians", "overhead_ratio_cpu", "xlt_median_step_seconds",
                "plain_median_step_seconds"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["steps_timed"] == 3 and r["tokens_per_step"] == 64
    # both trainers saw the same batches in the same order: identical losses from identical weights
    assert r["max_loss_diff"] == 0.0
    assert r["xlt_logs_token_accounting"] is True


def test_mfu_json_cpu():
    r = run_json("mfu.py", "--device", "cpu", "--hidden", "64", "--layers", "1", "--heads", "4", "--kv-heads", "2",
                 "--intermediate", "128", "--vocab", "512", "--seq-len", "64", "--batch", "2", "--steps", "2",
                 "--warmup", "1", "--peak-tflops", "1")
    assert r["device_type"] == "cpu" and isinstance(r["device"], str)
    assert isinstance(r["params"], int) and r["params"] > 0
    for key in ("tokens_per_second", "mfu", "flops_per_token", "step_seconds"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["peak_memory_gb"] is None  # no GPU memory on CPU
    # PaLM appendix B: 6 N + 12 L H T, N counting the (tied) LM head once but not the embedding lookup
    assert r["flops_per_token"] == 6 * r["params"] + 12 * 1 * 64 * 64
    assert r["mfu"] == pytest.approx(r["tokens_per_second"] * r["flops_per_token"] / 1e12, rel=1e-3)
    assert r["loss_finite"] is True


def test_mfu_cpu_without_peak_reports_null():
    r = run_json("mfu.py", "--device", "cpu", "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                 "--intermediate", "64", "--vocab", "256", "--seq-len", "32", "--batch", "1", "--steps", "1",
                 "--warmup", "0")
    assert r["mfu"] is None and r["tokens_per_second"] > 0
