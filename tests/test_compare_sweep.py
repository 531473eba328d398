"""``xlt compare`` sweeps: ``sweep: {new_tokens: [...]}`` expands into arms, ``compute.flops`` may list several
budgets, and each budget gets its best arm, Pareto front and a recommendation of how many new tokens pay."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from conftest import REPO
from xlt.compare import (
    budget_configs,
    crossings,
    load_config,
    pareto_front,
    recommendation,
    summarise,
    write_outputs,
)
from xlt.config import XltError

CPT = str(REPO / "recipes/smollm2-135m-ja/cpt.yaml")


def _write(tmp_path, **cfg) -> str:
    ja, en = tmp_path / "ja.jsonl", tmp_path / "en.txt"
    ja.write_text(json.dumps({"text": "吾輩は猫である。"}, ensure_ascii=False) + "\n", encoding="utf-8")
    en.write_text("Speak, speak.\n", encoding="utf-8")
    full = {"recipe": CPT, "compute": {"flops": [1e12, 4e12]}, "heldout": {"ja": [str(ja)], "en": [str(en)]},
            "output_dir": str(tmp_path / "out"), **cfg}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(full, allow_unicode=True), encoding="utf-8")
    return str(path)


def test_a_new_tokens_sweep_expands_into_arms_at_every_budget(tmp_path):
    path = _write(tmp_path, sweep={"new_tokens": [0, 32, 64], "overrides": {"embedding_init": "align"}},
                  arms=[{"name": "extend-lr10", "overrides": {"tokenizer_mode": "extend", "new_rows_lr_multiplier": 10}}])
    cfg = load_config(path)
    assert [a.name for a in cfg.arms] == ["base", "new_tokens-32", "new_tokens-64", "extend-lr10"]
    assert cfg.arms[0].recipe["tokenizer_mode"] == "none"
    for arm, n in zip(cfg.arms[1:3], (32, 64)):
        assert (arm.recipe["tokenizer_mode"], arm.recipe["new_tokens"], arm.recipe["embedding_init"]) == ("extend", n, "align")
    subs = budget_configs(cfg)
    assert [(s.flops, s.output_dir) for s in subs] == [(1e12, str(tmp_path / "out" / "budget-1")),
                                                        (4e12, str(tmp_path / "out" / "budget-2"))]
    assert all(s.arms == cfg.arms and s.budgets == 1 for s in subs)
    single = load_config(_write(tmp_path, compute={"base_train_tokens": 4096}, sweep={"new_tokens": [0, 16]}))
    assert budget_configs(single) == [single]


@pytest.mark.parametrize("sweep,says", [
    ({"new_tokens": [0, -8]}, "sweep.new_tokens: expected whole numbers >= 0, got -8"),
    ({"new_tokens": [0, 16, 16]}, "sweep.new_tokens: repeated values"),
    ({"new_tokens": [], }, "sweep: give one recipe key with a non-empty list"),
    ({"new_tokens": [16, 32]}, "no arm named 'base'"),
    ({"new_tokens": [0, 16], "overrides": {"max_steps": 3}}, "max_steps is set by the comparison"),
])
def test_a_bad_sweep_is_one_line(tmp_path, sweep, says):
    with pytest.raises(XltError, match=says.replace("(", r"\(").replace(")", r"\)")) as e:
        load_config(_write(tmp_path, sweep=sweep))
    assert "\n" not in str(e.value)
    with pytest.raises(XltError, match="compute.flops: repeated budgets"):
        load_config(_write(tmp_path, compute={"flops": [1e12, 1e12]}, sweep={"new_tokens": [0, 16]}))


def _row(name, new_tokens, budget, ja_bpc, cpt, cps=None):
    curve = [{"step": 0, "tokens": 0, "flops": 0.0, "ja_bpc": ja_bpc + 1, "en_bpc": 3.0},
             {"step": 4, "tokens": 512, "flops": budget, "ja_bpc": ja_bpc, "en_bpc": 2.5}]
    return {"name": name, "new_tokens": new_tokens, "budget_flops": budget, "flops": budget, "ja_bpc": ja_bpc,
            "en_bpc": 2.5, "ja_bpc_step0": ja_bpc + 1, "en_bpc_step0": 3.0, "ja_chars_per_token": cpt,
            "chars_per_second": cps, "tokens": 512, "curve": curve, "overrides": {}}


def test_each_budget_says_which_arm_wins_the_front_and_how_many_new_tokens_pay(tmp_path):
    rows = [_row("base", 0, 1e12, 5.0, 0.6, 10.0), _row("new_tokens-32", 32, 1e12, 5.2, 0.8, 12.0),
            _row("new_tokens-64", 64, 1e12, 5.5, 1.0, 14.0),
            _row("base", 0, 4e12, 4.0, 0.6, 10.0), _row("new_tokens-32", 32, 4e12, 3.9, 0.8, 12.0),
            _row("new_tokens-64", 64, 4e12, 3.95, 1.0, 15.0)]
    low, high = rows[:3], rows[3:]
    assert pareto_front(low) == ["base", "new_tokens-32", "new_tokens-64"]  # each trades bpc for chars/token
    assert pareto_front(high) == ["new_tokens-32", "new_tokens-64"]  # 32 beats base on both
    r = recommendation(low)
    assert (r["new_tokens"], r["arm"], r["ja_bpc_delta"]) == (0, None, pytest.approx(0.2))
    assert r["text"].startswith("none at this budget: the best extended arm (new_tokens-32, 32 new tokens) is +0.200")
    r = recommendation(high)
    assert (r["new_tokens"], r["arm"], r["ja_bpc_delta"]) == (32, "new_tokens-32", pytest.approx(-0.1))
    assert r["speedup_chars_per_token"] == pytest.approx(0.8 / 0.6, abs=1e-3)
    assert r["speedup_chars_per_second"] == pytest.approx(1.2)
    summarise(rows)
    assert [x["best_at_budget"] for x in rows] == [True, False, False, False, True, False]
    assert [x["on_pareto_front"] for x in rows] == [True, True, True, False, True, True]
    assert rows[0]["recommendation"] is rows[2]["recommendation"] and rows[3]["recommendation"]["new_tokens"] == 32
    write_outputs(str(tmp_path), rows, {"ja": ["吾輩は猫である。"], "en": ["Speak."]})
    md = (tmp_path / "compare.md").read_text(encoding="utf-8")
    assert md.count("## Budget") == 2 and "recommendation: 32 new tokens pay (new_tokens-32" in md
    assert json.loads((tmp_path / "compare.json").read_text(encoding="utf-8"))[4]["recommendation"]["arm"] == "new_tokens-32"
    assert os.path.getsize(tmp_path / "compare.png") > 0


def test_three_budgets_extrapolate_where_each_count_would_meet_the_original_tokenizer(tmp_path):
    """The gap to base per budget, a least-squares line in log2 FLOPs, its zero: worked by hand below."""
    rows = []
    for budget, base_bpc, gaps in ((1e12, 6.0, (0.6, 1.0, 0.2)), (2e12, 5.5, (0.5, 1.1, 0.0)),
                                   (4e12, 5.0, (0.4, 1.05, -0.2))):
        rows += [dict(_row("base", 0, budget, base_bpc, 0.6), n_eff=1e8)]
        rows += [_row(f"new_tokens-{n}", n, budget, base_bpc + g, 0.8) for n, g in zip((32, 64, 128), gaps)]
    rows.append(_row("new_tokens-256", 256, 4e12, 6.0, 0.9))  # one budget only: nothing to extrapolate
    cross = crossings(rows)
    assert sorted(cross) == ["new_tokens-128", "new_tokens-32", "new_tokens-64"]
    c = cross["new_tokens-32"]
    # 0.6, 0.5, 0.4 at log2 budgets x, x+1, x+2: -0.1 per doubling, zero 4 doublings past 4e12 = 6.4e13 FLOPs,
    # 6.4e13 / (6 x 1e8) = 106,667 tokens of the base arm.
    assert (c["gap_per_doubling"], c["max_residual"], c["gaps"]) == (pytest.approx(-0.1), pytest.approx(0.0),
                                                                   [0.6, 0.5, 0.4])
    assert c["crossing_flops"] == pytest.approx(6.4e13, rel=1e-9) and c["crossing_base_tokens"] == 106667
    assert "would meet the original tokenizer at ~6.4e+13 FLOPs" in c["text"] and "16x the largest" in c["text"]
    # 1.0, 1.1, 1.05: slope (-1 x -0.05 + 1 x 0) / 2 = +0.025, line 1.025 / 1.05 / 1.075: residual 0.05.
    c = cross["new_tokens-64"]
    assert (c["gap_per_doubling"], c["max_residual"]) == (pytest.approx(0.025), pytest.approx(0.05))
    assert c["crossing_flops"] is None and c["crossing_base_tokens"] is None and "no crossing in sight" in c["text"]
    c = cross["new_tokens-128"]
    assert c["crossing_flops"] == pytest.approx(2e12) and "already at or below" in c["text"]
    summarise(rows)
    assert [r.get("crossing", {}).get("arm") for r in rows[:4]] == [None, "new_tokens-32", "new_tokens-64",
                                                                     "new_tokens-128"]
    assert rows[1]["crossing"] is rows[5]["crossing"] and "crossing" not in rows[-1]
    write_outputs(str(tmp_path), rows, {"ja": ["吾輩は猫である。"], "en": ["Speak."]})
    md = (tmp_path / "compare.md").read_text(encoding="utf-8")
    assert "## Where the curves would cross" in md
    assert "| new_tokens-32 | 32 | +0.600 | +0.500 | +0.400 | -0.100 | 0.000 | 6.4e+13 | 106,667 |" in md
    assert "| new_tokens-64 | 64 | +1.000 | +1.100 | +1.050 | +0.025 | 0.050 | never (not shrinking) |  |" in md
    saved = json.loads((tmp_path / "compare.json").read_text(encoding="utf-8"))
    assert saved[1]["crossing"]["crossing_base_tokens"] == 106667
    assert os.path.getsize(tmp_path / "compare.png") > 0


def test_the_shipped_vocabulary_sweep_loads(tmp_path, monkeypatch):
    from conftest import shared_file

    monkeypatch.setenv("XLT_SHARED_DATA", str(shared_file("ja_wiki_paragraphs.jsonl").parent))
    cfg = load_config(str(REPO / "recipes/smollm2-135m-ja/compare_vocab.yaml"), str(tmp_path / "out"))
    assert [a.name for a in cfg.arms] == ["base"] + [f"new_tokens-{n}" for n in (16, 64, 256)]
    assert [s.base_train_tokens for s in budget_configs(cfg)] == [2048, 4096, 8192]


def test_later_budgets_reuse_each_arms_tokenizer_stage_and_step0_scores(tmp_path, tiny_model_dir, monkeypatch):
    """Two budgets on a tiny model: each arm's tokenizer stage runs and its step 0 is scored once; the second
    budget's run folder holds the same stage files (hard links) and trains from them."""
    import xlt.compare
    import xlt.train.cpt
    from xlt.compare import run_compare

    stages, scored = [], []
    real_stage, real_score = xlt.train.cpt.run_tokenizer_stage, xlt.compare.score_model
    monkeypatch.setattr(xlt.train.cpt, "run_tokenizer_stage", lambda *a: stages.append(a[-1].output_dir)
                        or real_stage(*a))
    monkeypatch.setattr(xlt.compare, "score_model", lambda d, *a, **k: scored.append(d) or real_score(d, *a, **k))
    path = _write(tmp_path, compute={"base_train_tokens": [256, 512], "tolerance": 0.5},
                  sweep={"new_tokens": [0, 16]},
                  overrides={"model": tiny_model_dir, "tokenizer_max_chars": 20000, "seq_len": 64, "slw_min_len": 8,
                             "per_device_train_batch_size": 2, "save_steps": 1000, "logging_steps": 1,
                             "warmup_steps": 1, "eval_max_docs": 8},
                  eval={"max_chars": 200, "max_length": 64, "checkpoints": False, "speed_prompts": 0})
    rows, out = run_compare(path)
    b1, b2 = (os.path.join(out, f"budget-{k}", "new_tokens-16") for k in (1, 2))
    assert stages == [b1]  # the tokenizer stage built once
    step0 = [d for d in scored if not d.endswith("cpt")]
    assert len(step0) == 2 and step0[1] == os.path.join(b1, "tokenizer")  # base (the model itself), then b1's
    assert sorted(scored[2:]) == sorted(os.path.join(out, f"budget-{k}", a, "cpt") for k in (1, 2)
                                        for a in ("base", "new_tokens-16"))
    for name in os.listdir(os.path.join(b1, "tokenizer")):
        assert os.stat(os.path.join(b1, "tokenizer", name)).st_ino == os.stat(os.path.join(b2, "tokenizer", name)).st_ino
    by = {(r["name"], r["budget_flops"]): r for r in rows}
    low, high = sorted({r["budget_flops"] for r in rows})
    for name in ("base", "new_tokens-16"):
        assert by[(name, low)]["ja_bpc_step0"] == by[(name, high)]["ja_bpc_step0"]
        assert by[(name, high)]["tokens"] > by[(name, low)]["tokens"]
    # Trained from the linked stage, not a rebuilt one (a rebuild swaps in a new folder: other inodes, checked above).
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(os.path.join(b2, "cpt"))
    assert trained.get_input_embeddings().weight.shape[0] == by[("new_tokens-16", high)]["head_rows"]
