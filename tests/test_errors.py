"""Bad input stops with one line naming the problem and a non-zero exit, before any model is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from xlt.cli import main

CPT = REPO / "recipes/smollm2-135m-ja/cpt.yaml"


def recipe(tmp_path, **changes) -> str:
    data = yaml.safe_load(CPT.read_text(encoding="utf-8"))
    data.update(changes)
    data["output_dir"] = data.get("output_dir") if "output_dir" in changes else str(tmp_path / "run")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return str(path)


def run_cli(capsys, argv) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("changes,argv_extra,message", [
    ({"learnig_rate": 1e-4}, [], "unknown recipe key(s) learnig_rate"),
    ({"sources": [{"name": "x", "lang": "ja", "path": "/no/such/file.jsonl"}]}, [], "data file not found: /no/such/file.jsonl"),
    ({}, ["--model", "smollm3-135m"], "unknown model 'smollm3-135m'"),
    ({"ja_ratio_end": 1.2}, [], "ja_ratio_end=1.2 is outside [0, 1]"),
    ({"sources": [{"name": "en", "lang": "en", "embedded": "chatterbot-en"}]}, [], "no source has lang: ja"),
])
def test_bad_cpt_input(tmp_path, capsys, no_model_loading, changes, argv_extra, message):
    rc, err = run_cli(capsys, ["cpt", "--config", recipe(tmp_path, **changes), *argv_extra])
    assert rc == 2
    assert err.startswith("xlt: error: ") and message in err and "\n" not in err


def test_dataset_without_the_text_field(tmp_path, capsys, no_model_loading):
    data = tmp_path / "ja.jsonl"
    data.write_text(json.dumps({"content": "日本語"}, ensure_ascii=False) + "\n", encoding="utf-8")
    path = recipe(tmp_path, sources=[{"name": "ja", "lang": "ja", "path": str(data)},
                                     {"name": "en", "lang": "en", "embedded": "chatterbot-en"}])
    rc, err = run_cli(capsys, ["cpt", "--config", path])
    assert rc == 2 and f"{data} has no field 'text' (fields: content)" in err


def test_output_dir_holding_a_different_run(tmp_path, capsys, no_model_loading):
    out = tmp_path / "run"
    out.mkdir()
    (out / "xlt_run.json").write_text(json.dumps({"cpt": {"model": "org/other", "learning_rate": 1}}))
    rc, err = run_cli(capsys, ["cpt", "--config", recipe(tmp_path, output_dir=str(out))])
    assert rc == 2 and f"output dir {out} holds a different cpt run" in err
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    rc, err = run_cli(capsys, ["cpt", "--config", recipe(tmp_path, output_dir=str(stranger))])
    assert rc == 2 and "holds no xlt run" in err
    assert (stranger / "notes.txt").read_text() == "mine"  # nothing touched


def test_bad_sft_and_evaluate_input(tmp_path, capsys, no_model_loading):
    sft = tmp_path / "sft.yaml"
    sft.write_text(yaml.safe_dump({"sft_datasets": [{"adapter": "alpaca", "path": str(tmp_path / "none.jsonl")}],
                                   "output_dir": str(tmp_path / "r"), "bf16": False}))
    rc, err = run_cli(capsys, ["sft", "--config", str(sft)])
    assert rc == 2 and "sft_datasets[0]: data file not found" in err
    rc, err = run_cli(capsys, ["evaluate", "bpc", "--model", "nope", "--data", str(tmp_path / "x.jsonl"), "--json"])
    assert rc == 2 and "unknown model 'nope'" in err


def test_the_console_script_exits_non_zero_with_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "xlt.cli", "cpt", "--config", recipe(tmp_path, bogus_key=1)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("xlt: error")]
    assert lines == [f"xlt: error: unknown recipe key(s) bogus_key in {tmp_path / 'recipe.yaml'}"]


def test_language_check_follows_the_whole_schedule(tmp_path):
    """A piecewise schedule that stays at 100% Japanese needs no English source; one that dips below needs it."""
    from transformers import TrainingArguments

    from xlt.config import CptArguments, DataArguments, ModelArguments, TokenizerArguments, XltError, parse_recipe
    from xlt.train.cpt import check_cpt_inputs

    ja_only = [{"name": "ja", "lang": "ja", "embedded": "hironsan"}]
    for points, ok in (("0:1,1:1", True), ("0:1,0.5:1,1:0.9", False)):
        path = recipe(tmp_path, sources=ja_only, ja_schedule="piecewise", ja_points=points, tokenizer_mode="none")
        parsed = parse_recipe([ModelArguments, TokenizerArguments, DataArguments, CptArguments, TrainingArguments],
                              ["--config", path])
        if ok:
            check_cpt_inputs(*parsed)
        else:
            with pytest.raises(XltError, match="no source has lang: en"):
                check_cpt_inputs(*parsed)
