"""The data-pipeline benchmark runs and measures what it claims (speed is reported, not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_json():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "data_pipeline.py"), "--json", "--repeats", "1",
                          "--seq-len", "1024"], capture_output=True, text=True, check=True, cwd=ROOT, timeout=300)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("speedup_vs_group_texts", "xlt_dropped_tokens", "xlt_nonpad_fraction", "group_texts_dropped_tokens"):
        assert key in r
    assert r["xlt_dropped_tokens"] == 0 and r["xlt_nonpad_fraction"] == 1.0
    assert r["group_texts_dropped_tokens"] > 0  # group_texts drops each batch's remainder
    assert r["xlt_rows"] * 1024 >= r["xlt_tokens"] > (r["xlt_rows"] - 1) * 1024
    assert r["speedup_vs_group_texts"] > 0
