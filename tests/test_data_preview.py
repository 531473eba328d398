"""``xlt data preview``: per-step records of the run's data (the real stream, or the token shards' layout), JSON
output and the plot."""

import argparse
import json

import pytest
import yaml
from data_fixtures import data_args, smol_tokenizer, write_small_corpus

from xlt.commands.data import add_data_commands
from xlt.data.preview import KEYS, plot_preview, preview
from xlt.data.schedule import seq_len_at


def test_preview_records(tmp_path):
    args = data_args(write_small_corpus(tmp_path), seq_len=64, ja_schedule="step", ja_ratio_start=0.3,
                     ja_ratio_end=0.6, ja_ramp_fraction=0.8, slw_min_len=16, slw_fraction=0.5, data_source="stream")
    total, rps, steps = 64 * 4 * 50, 4, 50
    rows = preview(args, smol_tokenizer(), total, rps, steps)
    assert len(rows) == steps and all(tuple(r) == KEYS for r in rows)
    assert rows[-1]["tokens"] == total
    assert rows[0]["target_ja"] == pytest.approx(0.3) and rows[-1]["target_ja"] == pytest.approx(0.6)
    for r in rows:
        assert abs(r["realised_ja"] - r["target_ja"]) <= 1 / (64 * rps)
        assert abs(r["cum_realised_ja"] - r["cum_target_ja"]) <= 0.005
        assert r["seq_len"] == seq_len_at((r["step"] - 1) * 64 * rps, total, args)
    png = tmp_path / "curriculum.png"
    plot_preview(rows, str(png), args, total)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def _parser():
    parser = argparse.ArgumentParser(prog="xlt")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_json_and_plot(tmp_path, capsys):
    recipe = {"model": "smollm2-135m", "sources": write_small_corpus(tmp_path), "seq_len": 64,
              "ja_schedule": "linear", "ja_ratio_start": 0.2, "ja_ratio_end": 0.7, "slw_min_len": 16,
              "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "train_tokens": 64 * 4 * 30,
              "output_dir": str(tmp_path / "run"), "report_to": "none"}
    path = tmp_path / "cpt.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    ns = _parser().parse_args(["data", "preview", "--config", str(path), "--steps", "12", "--json",
                               "--plot", str(tmp_path / "p.png")])
    assert ns.func(ns) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in rows] == list(range(1, 13)) and set(rows[0]) == set(KEYS)
    assert rows[1]["tokens"] == 2 * 64 * 4
    assert (tmp_path / "p.png").is_file()
    ns = _parser().parse_args(["data", "preview", "--config", str(path)])
    assert ns.func(ns) == 0
    out = capsys.readouterr().out
    assert "30 steps" in out and out.count("\n") >= 33
    assert "data: token shards (data_source: shards)" in out  # the default: what xlt cpt will read


def test_cli_bad_recipe_is_one_line(tmp_path, capsys):
    recipe = {"model": "smollm2-135m", "sources": write_small_corpus(tmp_path), "ja_ratio_end": 1.3,
              "max_steps": 5, "output_dir": str(tmp_path / "run")}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    ns = _parser().parse_args(["data", "preview", "--config", str(path)])
    assert ns.func(ns) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ja_ratio_end=1.3 is outside [0, 1]" in err
