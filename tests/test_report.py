"""``xlt report RUN_DIR``: REPORT.md with a section per figure and valid PNG plots beside it."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import REPO
from xlt.cli import main, run_recipe
from xlt.report import SECTIONS, build_report, ja_share_windows, training_history

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _log(step: int, tokens: int, ja: float, target: float, seq_len: int, loss: float,
         cum_target: float | None = None) -> dict:
    return {"step": step, "loss": loss, "tokens_trained": tokens, "tokens_trained_ja": int(tokens * ja),
            "tokens_trained_en": tokens - int(tokens * ja), "ja_share_cum": ja, "ja_share_target": target,
            "ja_share_cum_target": ja if cum_target is None else cum_target, "seq_len": seq_len,
            "learning_rate": 1e-4}


def synthetic_run(root, mc: bool = True) -> str:
    """A run directory as CPT + evaluate leave it: report.json and a complete checkpoint's trainer_state.json."""
    run = root / "run"
    ckpt = run / "checkpoint-8"
    ckpt.mkdir(parents=True)
    history = [_log(4, 4096, 0.52, 0.55, 128, 3.9), {"step": 4, "eval_loss": 3.5},
               _log(8, 8192, 0.58, 0.65, 256, 3.1)]
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 8, "log_history": history}))
    (ckpt / "xlt_state.json").write_text("{}")  # marks the checkpoint complete
    report = {
        "tokens_trained": {"ja": 4751, "en": 3441},
        "cpt": {"model": "smollm2-135m", "steps": 8, "tokens_per_step": 1024, "train_loss": 3.4,
                "accounting": {"tokens_trained": {"ja": 4751, "en": 3441}, "target_tokens": {"ja": 4800, "en": 3392},
                               "tokens_by_source": {"news": 3000, "dialogue-ja": 1751, "dialogue-en": 3441},
                               "epochs_by_source": {"news": 0.5, "dialogue-ja": 0.25, "dialogue-en": 0.1},
                               "ja_share_trained": 0.58}},
        "tokenizer": {"ja_chars_per_token": {"base": 0.56, "extended": 1.21},
                      "en_chars_per_token": {"base": 3.65, "extended": 3.65}, "new_tokens": 1024},
        "bpc": {"ja": {"base": 6.5, "cpt": 4.125, "sft": 4.2}, "en": {"base": 2.1, "cpt": 2.2, "sft": 2.25}},
    }
    if mc:
        report["mc"] = {"base": {"accuracy": 0.21, "accuracy_norm": 0.24, "n": 100, "ci95": [0.14, 0.30]},
                        "sft": {"accuracy": 0.37, "accuracy_norm": 0.41, "n": 100, "ci95": [0.28, 0.47]}}
        report["speed"] = {"base": {"chars_per_second": 41.5, "chars_per_token": 0.56},
                           "sft": {"chars_per_second": 88.25, "chars_per_token": 1.21}}
    (run / "report.json").write_text(json.dumps(report))
    return str(run)


def _assert_png(path: str) -> None:
    from PIL import Image

    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 200 and im.size[1] > 150


def test_report_names_every_section_and_writes_valid_pngs(tmp_path):
    run = synthetic_run(tmp_path)
    path = build_report(run)
    assert path == os.path.join(run, "REPORT.md")
    text = open(path, encoding="utf-8").read()
    positions = [text.index(f"## {s}") for s in SECTIONS]
    assert positions == sorted(positions)  # every section, in order
    assert "Not measured" not in text
    plots = ("loss", "ja_share", "seq_len", "tokens", "tokenizer", "bpc", "mc", "speed")
    for name in plots:
        assert f"](plots/{name}.png)" in text
        _assert_png(os.path.join(run, "plots", f"{name}.png"))
    assert sorted(os.listdir(os.path.join(run, "plots"))) == sorted(f"{n}.png" for n in plots)
    # Figures from the sources: last log point's shares, per-source tokens, bpc, MC with its CI, speed.
    # A rising schedule met exactly: cumulative realised equals the cumulative target, the last window's realised
    # share equals the schedule over that window; the instantaneous schedule (0.650) is no cumulative figure.
    assert ("realised 0.580 cumulative, cumulative target 0.580; last window realised 0.640, schedule over that "
            "window 0.640, schedule at that point 0.650; over the whole run 0.580.") in text
    assert "| dialogue-ja | 1,751 | 0.25 |" in text
    assert "| ja | 6.5 | 4.125 | 4.2 |" in text
    assert "| sft | 0.37 | 0.41 | [0.280, 0.470] | 100 |" in text
    assert "88.25" in text and "checkpoint-8/trainer_state.json`, 2 log points" in text


def test_ja_share_windows_compare_like_with_like():
    """Per window: realised share of the window's tokens; target: the schedule's mean over the window (from the
    cumulative target), not the instantaneous share at its end."""
    rows = [_log(1, 1000, 0.5, 0.6, 128, 3.0, cum_target=0.55), {"step": 1, "eval_loss": 3.0},
            _log(2, 3000, 0.6, 0.8, 128, 2.0, cum_target=0.65)]
    got = ja_share_windows(rows)
    assert [(w["start"], w["end"]) for w in got] == [(0, 1000), (1000, 3000)]
    assert got[0]["realised"] == 0.5 and got[1]["realised"] == (1800 - 500) / 2000
    assert got[0]["target"] == pytest.approx(0.55) and got[1]["target"] == pytest.approx((1950 - 550) / 2000)
    # A log without the cumulative target (older runs) still gets the realised windows, no made-up target.
    old = [{k: v for k, v in r.items() if k != "ja_share_cum_target"} for r in rows]
    assert [w["realised"] for w in ja_share_windows(old)] == [w["realised"] for w in got]
    assert all("target" not in w for w in ja_share_windows(old))


def test_unmeasured_sections_say_so_and_draw_nothing(tmp_path):
    run = synthetic_run(tmp_path, mc=False)
    text = open(build_report(run), encoding="utf-8").read()
    for s in SECTIONS:
        assert f"## {s}" in text
    assert text.count("_Not measured:") == 2
    assert not os.path.exists(os.path.join(run, "plots", "mc.png"))
    assert not os.path.exists(os.path.join(run, "plots", "speed.png"))


def test_cli_positional_and_output_dir_forms(tmp_path, capsys):
    run = synthetic_run(tmp_path)
    for argv in (["report", run], ["report", "--output_dir", run]):
        os.remove(os.path.join(run, "REPORT.md")) if os.path.exists(os.path.join(run, "REPORT.md")) else None
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "bits per character" in out and "6.5000" in out  # the table, as before
        assert os.path.isfile(os.path.join(run, "REPORT.md"))
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "report.json not found" in err


def test_report_from_a_real_cpt_run(tmp_path, tiny_model_dir):
    """The keys the report plots are the ones continued pretraining logs (ja_share_*, seq_len, tokens_trained)."""
    out = str(tmp_path / "r")
    assert run_recipe("cpt", ["--config", str(REPO / "recipes/smollm2-135m-ja/cpt.yaml"), "--model", tiny_model_dir,
                              "--output_dir", out, "--new_tokens", "64", "--train_tokens", "4096",
                              "--save_steps", "2", "--logging_steps", "2", "--eval_max_docs", "8"]) == 0
    text = open(build_report(out), encoding="utf-8").read()
    rows = training_history(out)[0]
    for r in rows:  # the log holds the cumulative target the plot compares the cumulative realised share with
        assert abs(r["ja_share_cum"] - r["ja_share_cum_target"]) < 0.05, r
    assert len(ja_share_windows(rows)) == 2 and "cumulative target" in text
    for name in ("loss", "ja_share", "seq_len", "tokens", "tokenizer"):
        _assert_png(os.path.join(out, "plots", f"{name}.png"))
    assert "2 log points" in text
    # No evaluation ran: bits per character, MC and speed are reported as not measured.
    assert text.count("_Not measured:") == 3


def test_report_rejects_a_run_without_or_with_a_broken_report_json(tmp_path):
    from xlt.config import XltError

    (tmp_path / "run").mkdir()
    with pytest.raises(XltError, match="report.json not found"):
        build_report(str(tmp_path / "run"))
    (tmp_path / "run" / "report.json").write_text("{")
    with pytest.raises(XltError, match="report.json: not valid JSON"):
        build_report(str(tmp_path / "run"))


def test_training_log_falls_back_to_tensorboard_events(tmp_path):
    """Without a complete checkpoint (all rotated away), the curves come from report_to: tensorboard."""
    from torch.utils.tensorboard import SummaryWriter

    run = synthetic_run(tmp_path)
    shutil.rmtree(os.path.join(run, "checkpoint-8"))
    w = SummaryWriter(os.path.join(run, "runs", "Nov01_00-00-00_host"))
    for step, tokens, loss, ja in ((2, 2048, 4.0, 0.5), (4, 4096, 3.5, 0.55), (6, 6144, 3.0, 0.6)):
        for tag, v in (("loss", loss), ("tokens_trained", tokens), ("ja_share_cum", ja), ("seq_len", 256)):
            w.add_scalar(f"train/{tag}", v, step)
    w.close()
    text = open(build_report(run), encoding="utf-8").read()
    assert "Source: `TensorBoard events in runs/`, 3 log points." in text
    assert "realised 0.600" in text
    _assert_png(os.path.join(run, "plots", "ja_share.png"))


def test_sft_section_shows_eval_loss_per_epoch_counts_and_generations(tmp_path):
    from xlt.io import update_report

    run = synthetic_run(tmp_path)
    text = open(build_report(run), encoding="utf-8").read()
    assert "## Instruction SFT" not in text  # nothing to show: no section, no "not measured"
    update_report(run, {"sft": {"eval_loss": [{"epoch": 1.0, "eval_loss": 4.52}, {"epoch": 2.0, "eval_loss": 4.33}],
                                "counts": {"chatterbot-ja": {"rows": 568, "train_rows": 115, "eval_rows": 13,
                                                             "capped": 440, "duplicates": 0}},
                                "generations": [{"instruction": "日本の首都は？", "output": "東京です。"}]}})
    text = open(build_report(run), encoding="utf-8").read()
    sft = text[text.index("## Instruction SFT"):]
    assert "| 1 | 4.52 |" in sft and "| 2 | 4.33 |" in sft
    assert "| chatterbot-ja | 568 | 115 | 13 | 0 | 440 |" in sft and "- 日本の首都は？ → 東京です。" in sft


def test_a_run_that_kept_its_tokenizer_says_so_in_the_table_and_report(tmp_path):
    """make demo's default (tokenizer_mode none): the table and REPORT.md say the original tokenizer was kept and
    where the extension is measured, instead of an empty base/extended table or 'not measured'."""
    from xlt.report import format_table

    run = synthetic_run(tmp_path)
    path = os.path.join(run, "report.json")
    report = json.load(open(path, encoding="utf-8"))
    report["tokenizer"] = {"mode": "none", "new_tokens": 0}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f)
    table = format_table(report)
    assert "tokenizer_mode none" in table and "make compare" in table and "extended" not in table
    text = open(build_report(run), encoding="utf-8").read()
    assert "tokenizer was kept (`tokenizer_mode: none`)" in text and "no tokenizer section" not in text
    assert "6.5" in format_table(report)  # the rest of the table is unchanged
