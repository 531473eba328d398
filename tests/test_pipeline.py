"""A tiny end-to-end run: extend → continued pretraining → SFT → evaluate, and the outputs reload.

The recipe is the shipped demo recipe with a tiny random Llama (carrying the real SmolLM2
tokenizer) in place of the embedded model, so every stage runs for real in seconds.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import REPO
from xlt.cli import run_recipe

CPT = str(REPO / "recipes/smollm2-135m-ja/cpt.yaml")
SFT = str(REPO / "recipes/smollm2-135m-ja/sft.yaml")
EVAL = str(REPO / "recipes/smollm2-135m-ja/evaluate.yaml")


def cpt_args(model: str, out: str, *extra: str) -> list[str]:
    return ["--config", CPT, "--model", model, "--output_dir", out, "--new_tokens", "64", "--train_tokens", "6144",
            "--save_steps", "2", "--logging_steps", "2", "--eval_max_docs", "8", *extra]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    out = str(tmp_path_factory.mktemp("run") / "r")
    assert run_recipe("cpt", cpt_args(tiny_model_dir, out)) == 0
    assert run_recipe("sft", ["--config", SFT, "--output_dir", out, "--max_steps", "2",
                              "--per_device_train_batch_size", "2"]) == 0
    assert run_recipe("evaluate", ["--config", EVAL, "--output_dir", out, "--model", tiny_model_dir,
                                   "--eval_max_docs", "8", "--max_new_tokens", "4"]) == 0
    return out


def test_report_has_every_promised_figure(run_dir):
    with open(os.path.join(run_dir, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    tok = report["tokenizer"]
    assert tok["new_tokens"] > 0
    for lang in ("ja", "en"):
        assert set(tok[f"{lang}_chars_per_token"]) == {"base", "extended"}
        assert set(report["bpc"][lang]) == {"base", "cpt", "sft"}
        assert all(v > 0 for v in report["bpc"][lang].values())
    # Extension makes Japanese cheaper and leaves English alone.
    assert tok["ja_chars_per_token"]["extended"] > tok["ja_chars_per_token"]["base"]
    assert tok["en_chars_per_token"]["extended"] == pytest.approx(tok["en_chars_per_token"]["base"])
    trained = report["tokens_trained"]
    assert sum(trained.values()) == 6144 and trained["ja"] > trained["en"] > 0
    assert report["cpt"]["steps"] == 6 and report["sft"]["steps"] == 2
    # Generation speed of every stage, same prompts and output length (the speed-up a tokenizer buys).
    assert set(report["speed"]) == {"base", "cpt", "sft"}
    assert all(v["chars"] > 0 and v["chars_per_second"] > 0 for v in report["speed"].values())
    assert report["eval"]["speedup_cpt_over_base"] > 0


def test_final_models_reload_with_auto_classes(run_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for stage in ("tokenizer", "cpt", "sft"):
        path = os.path.join(run_dir, stage)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.get_input_embeddings().weight.shape[0] >= len(tok)
        ids = tok("日本語の文章です。", return_tensors="pt").input_ids
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all()
    base = AutoTokenizer.from_pretrained(os.path.join(run_dir, "tokenizer"))
    sft = AutoTokenizer.from_pretrained(os.path.join(run_dir, "sft"))
    assert len(base) == len(sft)


def test_cpt_changed_the_weights_and_sft_changed_them_again(run_dir):
    from safetensors.torch import load_file

    w = {s: load_file(os.path.join(run_dir, s, "model.safetensors")) for s in ("tokenizer", "cpt", "sft")}
    key = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(w["tokenizer"][key], w["cpt"][key])
    assert not torch.equal(w["cpt"][key], w["sft"][key])


def test_checkpoints_carry_stream_state_and_accounting(run_dir):
    ckpts = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint-"))
    assert ckpts
    with open(os.path.join(run_dir, ckpts[-1], "xlt_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    assert state["rows_consumed"] == state["global_step"] * 4
    assert sum(state["accounting"]["tokens_trained"].values()) == state["rows_consumed"] * 256


def test_every_log_line_carries_the_monitoring_keys_and_the_report_names_the_kernel(run_dir):
    """README "Monitoring": every log line has tokens_per_second, tokens_trained(_ja/_en), ja_share_cum,
    ja_share_target, seq_len and skipped_steps (the Trainer's log history, kept in the checkpoint); "the attention
    kernel used is written to report.json" (auto resolves to sdpa on a CPU, for both training stages)."""
    ckpt = max((d for d in os.listdir(run_dir) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1]))
    with open(os.path.join(run_dir, ckpt, "trainer_state.json"), encoding="utf-8") as f:
        lines = [h for h in json.load(f)["log_history"] if "loss" in h]
    assert [h["step"] for h in lines] == [2, 4, 6]
    for h in lines:
        assert h["tokens_per_second"] > 0 and h["skipped_steps"] == 0
        assert h["tokens_trained"] == h["step"] * 1024 == h["tokens_trained_ja"] + h["tokens_trained_en"]
        assert h["ja_share_cum"] == round(h["tokens_trained_ja"] / h["tokens_trained"], 4)
        assert 0 < h["ja_share_target"] < 1 and 0 < h["seq_len"] <= 256 and h["seq_len"] % 8 == 0
    with open(os.path.join(run_dir, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert report["cpt"]["attn_implementation"] == report["sft"]["attn_implementation"] == "sdpa"


def test_same_run_again_resumes_and_does_nothing_more(run_dir, tiny_model_dir):
    stamps = {s: os.path.getmtime(os.path.join(run_dir, s, "model.safetensors")) for s in ("cpt", "sft")}
    with open(os.path.join(run_dir, "report.json"), encoding="utf-8") as f:
        before = json.load(f)["cpt"]["steps"]
    assert run_recipe("cpt", cpt_args(tiny_model_dir, run_dir)) == 0
    assert run_recipe("sft", ["--config", SFT, "--output_dir", run_dir, "--max_steps", "2",
                              "--per_device_train_batch_size", "2"]) == 0
    with open(os.path.join(run_dir, "report.json"), encoding="utf-8") as f:
        assert json.load(f)["cpt"]["steps"] == before
    assert stamps == {s: os.path.getmtime(os.path.join(run_dir, s, "model.safetensors")) for s in ("cpt", "sft")}


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, tiny_model_dir):
    """The in-memory stream (its own resume: the stream state in the checkpoint): stop after 2 of 4 steps, resume:
    the final weights equal an uninterrupted run's. The shards' resume: test_data_shards."""
    from safetensors.torch import load_file

    common = ["--tokenizer_mode", "none", "--train_tokens", "4096", "--save_steps", "2", "--data_source", "stream"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert run_recipe("cpt", cpt_args(tiny_model_dir, full, *common)) == 0
    with open(os.path.join(full, "report.json"), encoding="utf-8") as f:  # the table can say the tokenizer was kept
        assert json.load(f)["tokenizer"] == {"mode": "none", "new_tokens": 0}
    # The interrupted run: same settings, stopped by hand after its step-2 checkpoint.
    from transformers import TrainerCallback

    import xlt.train.cpt as cpt_module

    class StopAt2(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step >= 2:
                raise KeyboardInterrupt

    original = cpt_module.CptTrainer

    class Interrupted(original):
        def __init__(self, *a, **k):
            k["callbacks"] = list(k.get("callbacks") or []) + [StopAt2()]
            super().__init__(*a, **k)

    cpt_module.CptTrainer = Interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            run_recipe("cpt", cpt_args(tiny_model_dir, part, *common))
    finally:
        cpt_module.CptTrainer = original
    assert not os.path.exists(os.path.join(part, "cpt"))
    assert run_recipe("cpt", cpt_args(tiny_model_dir, part, *common)) == 0
    a = load_file(os.path.join(full, "cpt", "model.safetensors"))
    b = load_file(os.path.join(part, "cpt", "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    with open(os.path.join(full, "report.json")) as f1, open(os.path.join(part, "report.json")) as f2:
        assert json.load(f1)["tokens_trained"] == json.load(f2)["tokens_trained"]


def test_two_processes_train_like_one(tmp_path, tiny_model_dir):
    """The in-memory stream (batches dispatched from process 0): torchrun with 2 gloo processes x batch 2 = 1 process
    x batch 4: same stream, same tokens, same weights. The shards' rows per rank: test_data_shards."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    common = ["--tokenizer_mode", "none", "--train_tokens", "4096", "--save_steps", "100", "--logging_steps", "2",
              "--data_source", "stream"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert run_recipe("cpt", cpt_args(tiny_model_dir, one, *common, "--per_device_train_batch_size", "4")) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29533", str(REPO / "recipes/cpt.py"),
                           *cpt_args(tiny_model_dir, two, *common, "--per_device_train_batch_size", "2")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes 2 = 1,024" in proc.stdout
    reports = []
    for d in (one, two):
        with open(os.path.join(d, "report.json"), encoding="utf-8") as f:
            reports.append(json.load(f))
    assert reports[0]["tokens_trained"] == reports[1]["tokens_trained"]
    assert reports[0]["cpt"]["accounting"]["tokens_by_source"] == reports[1]["cpt"]["accounting"]["tokens_by_source"]
    a = load_file(os.path.join(one, "cpt", "model.safetensors"))
    b = load_file(os.path.join(two, "cpt", "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_extend_tokenizer_stage_is_reused_by_continued_pretraining(tmp_path, tiny_model_dir, capsys):
    out = str(tmp_path / "run")
    tok_recipe = str(REPO / "recipes/smollm2-135m-ja/tokenizer.yaml")
    assert run_recipe("extend_tokenizer", ["--config", tok_recipe, "--model", tiny_model_dir, "--output_dir", out,
                                           "--new_tokens", "64", "--eval_max_docs", "8"]) == 0
    assert "new tokens" in capsys.readouterr().out
    stamp = os.path.getmtime(os.path.join(out, "tokenizer", "model.safetensors"))
    assert run_recipe("cpt", cpt_args(tiny_model_dir, out, "--train_tokens", "1024")) == 0
    assert "tokenizer: reusing" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "tokenizer", "model.safetensors")) == stamp
    # Other tokenizer settings in the same directory are a different run: refused, nothing rebuilt.
    assert run_recipe("cpt", cpt_args(tiny_model_dir, out, "--train_tokens", "1024", "--new_tokens", "32")) == 2
    assert os.path.getmtime(os.path.join(out, "tokenizer", "model.safetensors")) == stamp
