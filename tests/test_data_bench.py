"""The data-pipeline benchmark runs and measures what it claims (speed is reported, not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_data_scale_prepare_counts_the_workers_cpu_seconds(tmp_path, ja_wiki):
    """``bench/data_scale.py``'s prepare figures: CPU seconds include the forked datatrove workers', so characters
    per CPU second compare 1 and 2 processes even when other jobs hold the cores."""
    import importlib.util

    from xlt.models import load_tokenizer

    spec = importlib.util.spec_from_file_location("data_scale", ROOT / "bench" / "data_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = tmp_path / "ja.jsonl"
    path.write_text("".join(json.dumps({"text": f"{t}\n({k})"}, ensure_ascii=False) + "\n"
                            for k in range(2) for t in ja_wiki), encoding="utf-8")
    specs = [{"name": "ja-wiki", "lang": "ja", "path": str(path)}]
    args, tokenizer = bench.data_args(specs), load_tokenizer("smollm2-135m")
    shard_bytes = path.stat().st_size // 4 + 1
    runs = {str(p): bench.measure_prepare(specs, args, tokenizer, str(tmp_path), p, shard_bytes) for p in (1, 2)}
    assert runs["1"]["chars"] == runs["2"]["chars"] > 0
    # On 2 processes the tokenizing happens in the workers: without their CPU seconds it would look free.
    assert runs["2"]["cpu"] > 0.6 * runs["1"]["cpu"] > 0
    r = bench.prepare_figures(runs, (1.0, 2.0))
    assert set(r) == {"prepare_chars_per_second", "prepare_chars_per_cpu_second", "prepare_cores_used",
                      "prepare_wall_ratio_1_over_2", "prepare_cpu_efficiency_2_vs_1", "load_average"}
    assert r["prepare_cpu_efficiency_2_vs_1"] == pytest.approx(runs["1"]["cpu"] / runs["2"]["cpu"], abs=1e-3)
