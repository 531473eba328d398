"""The step-overhead and MFU benchmarks run and report what they claim (speed is reported, not asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import shared_file

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
    data = shared_file("ja_wiki_paragraphs.jsonl").parent
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


def test_gpu_smoke_runs_its_whole_path_on_cpu():
    """``bench/gpu_smoke.sh --cpu``: the script a lent GPU runs, on 2 gloo processes with tiny shapes, so it cannot
    rot: one JSON line, per-document attention exact, xlt's own FSDP2 CPT launch with the chunked loss, and
    ``xlt check``'s estimate for the same recipe and launcher."""
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_smoke.sh"), "--cpu", "--steps", "3"], capture_output=True,
                         text=True, cwd=ROOT, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 1, (out.stdout + out.stderr)[-3000:]
    r = json.loads(lines[0])
    assert r["mode"] == "cpu-dry" and "error" not in r
    att = r["attention"]
    assert att["kernel"] == "sdpa" and att["layout"] == "position_ids" and att["documents"] >= 4
    assert att["max_abs_diff"] < 1e-5  # packed rows at batch 2 score exactly as each document alone
    cpt = r["cpt"]
    assert cpt["launcher"] == "fsdp2" and cpt["steps"] == 3 and cpt["loss_implementation"] == "chunked"
    assert cpt["packed_layout"] == "position_ids" and cpt["precision"] == "fp32"
    assert cpt["tokens_per_second"] > 0 and cpt["logged_windows"] >= 2
    assert cpt["check_ok"] is True and cpt["estimated_memory_gb"] > 0 and set(cpt["estimated_breakdown_gb"]) >= {"weights", "logits"}
    assert cpt["mfu"] is None and cpt["peak_memory_gb"] is None  # no peak FLOP/s or device allocator on a CPU
