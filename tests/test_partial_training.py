"""Partial training (train_layers_first / train_layers_last / partial_training_fraction): the keys and their
refusals, frozen parameters and their Adam state untouched, exact resume, and the FLOPs charged for it."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import REPO, tiny_llama
from xlt.config import CptArguments, XltError
from xlt.flops import partial_flops_per_token, partial_trainable, solve_tokens, training_flops
from xlt.train.partial import PartialTraining, partial_settings
from xlt.validate import range_error

V, H, LAYERS = 96, 64, 4
# One tiny-Llama decoder layer (hidden 64, 4 heads of 16, 2 KV heads, MLP 128), by hand:
# q 64x64, k 64x32, v 64x32, o 64x64, gate 64x128, up 64x128, down 128x64, two RMSNorm weights of 64.
LAYER_MATMUL = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128
LAYER = LAYER_MATMUL + 2 * 64
HEAD = V * H


def _model(tie=True):
    return tiny_llama(V, tie=tie, layers=LAYERS, hidden=H)


# -- FLOPs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_partial_flops_match_a_hand_count(tie):
    """2x2 LS shape on 4 layers (first 1, last 1): layers 0 and 3 and the head 6 per parameter and token, layers 1
    and 2 and the final norm 4 (the trainable embedding lies below them); all trainable gives 6 N_eff."""
    m = _model(tie)
    assert sum(p.numel() for p in m.model.layers[0].parameters()) == LAYER
    got = partial_flops_per_token(m, partial_trainable(m, 1, 1))
    assert got == 6 * 2 * LAYER + 4 * (2 * LAYER + H) + 6 * HEAD
    everything = {id(p) for p in m.parameters()}
    assert partial_flops_per_token(m, everything) == 6 * (LAYERS * LAYER + H + HEAD)
    # embeddings + head only (the 2-stage recipe's first stage): every layer and the norm at 4
    assert partial_flops_per_token(m, partial_trainable(m, 0, 0)) == 4 * (LAYERS * LAYER + H) + 6 * HEAD


def test_a_frozen_prefix_costs_2_and_autograd_builds_no_graph_for_it():
    """Only layer 2 trains (embedding and layers 0-1 frozen: a frozen prefix): layers 0-1 at 2, layer 2 at 6,
    layer 3, the norm and the (tied, frozen) head at 4. The measured matmul FLOPs of a forward + backward
    (torch's FlopCounterMode) are the hand count's matmul part exactly: no backward runs through the prefix."""
    from torch.utils.flop_counter import FlopCounterMode

    m = _model(tie=True)
    trainable = {id(p) for p in m.model.layers[2].parameters()}
    assert partial_flops_per_token(m, trainable) == 2 * 2 * LAYER + 6 * LAYER + 4 * (LAYER + H + HEAD)
    for p in m.parameters():
        p.requires_grad_(id(p) in trainable)
    tokens = 24
    ids = torch.randint(0, V, (1, tokens))
    m.config._attn_implementation = "sdpa"
    with FlopCounterMode(display=False) as counter:
        m(input_ids=ids, labels=ids).loss.backward()
    ops = counter.get_flop_counts()["Global"]
    matmul = sum(v for k, v in ops.items() if str(k).split(".")[1] in ("mm", "addmm", "bmm"))
    assert matmul == tokens * (2 * 2 * LAYER_MATMUL + 6 * LAYER_MATMUL + 4 * (LAYER_MATMUL + HEAD))
    assert m.model.layers[1].self_attn.q_proj.weight.grad is None and m.model.layers[2].mlp.up_proj.weight.grad is not None


def test_partial_recipe_matmul_flops_are_measured_as_charged():
    """first 1 / last 1 with the embedding trainable: forward + backward matmul FLOPs measured = 6 per trainable
    matmul weight, 4 per frozen one (the norm weights are not matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = _model(tie=True)
    m.config._attn_implementation = "sdpa"
    keep = partial_trainable(m, 1, 1)
    for p in m.parameters():
        p.requires_grad_(id(p) in keep)
    ids = torch.randint(0, V, (2, 16))
    with FlopCounterMode(display=False) as counter:
        m(input_ids=ids, labels=ids).loss.backward()
    ops = counter.get_flop_counts()["Global"]
    matmul = sum(v for k, v in ops.items() if str(k).split(".")[1] in ("mm", "addmm", "bmm"))
    assert matmul == 32 * (6 * 2 * LAYER_MATMUL + 4 * 2 * LAYER_MATMUL + 6 * HEAD)


def test_solve_tokens_gives_a_partial_arm_more_tokens_at_equal_flops():
    n_eff, tps = 1000.0, 10
    full_steps, _ = solve_tokens(6e6, n_eff, 0.0, tps)
    assert full_steps == 100
    # the whole run partial at 4000 FLOPs per token: 6e6 / 4000 / 10 = 150 steps
    assert solve_tokens(6e6, n_eff, 0.0, tps, (1.0, 4000.0)) == (150, 1500)
    # half the run partial: s steps cost 10 * (4000 * ceil(s / 2) + 6000 * (s - ceil(s / 2))) = 6e6 at s = 120
    steps, tokens = solve_tokens(6e6, n_eff, 0.0, tps, (0.5, 4000.0))
    assert (steps, tokens) == (120, 1200)
    assert training_flops(n_eff, tokens, 0.0, 600, 4000.0) == 6e6
    # ceil: 3 steps at fraction 0.5 are 2 partial steps
    assert solve_tokens(2 * 4000 * tps + 6000 * tps, n_eff, 0.0, tps, (0.5, 4000.0)) == (3, 30)


# -- keys and refusals ------------------------------------------------------------------------
def test_keys_are_range_checked_and_refused_where_they_cannot_run():
    assert "must be >= 0" in range_error("train_layers_first", -1)
    assert "outside [0, 1]" in range_error("partial_training_fraction", 1.5)
    assert partial_settings(CptArguments(), 10) is None
    with pytest.raises(XltError, match="train_layers_last=2 needs partial_training_fraction"):
        partial_settings(CptArguments(train_layers_last=2), 10)
    c = CptArguments(train_layers_first=2, train_layers_last=2, partial_training_fraction=0.25)
    assert partial_settings(c, 10).steps == 3
    with pytest.raises(XltError, match="use_lora"):
        partial_settings(c, 10, use_lora=True)
    with pytest.raises(XltError, match="runs on one process; this launch is fsdp"):
        partial_settings(c, 10, world_size=2, launcher_kind="fsdp")
    with pytest.raises(XltError, match="ddp with 2"):
        partial_settings(c, 10, world_size=2, launcher_kind="ddp")
    with pytest.raises(XltError, match="more than the model's 3 decoder layers"):
        partial_settings(c, 10, layers=3)
    with pytest.raises(XltError, match="new_rows_warmup_fraction"):
        partial_settings(CptArguments(partial_training_fraction=0.5, new_rows_warmup_fraction=0.1), 10)


def test_xlt_check_refuses_partial_training_under_fsdp2_before_any_model_loads(no_model_loading, capsys):
    from xlt.cli import main

    cpt = str(REPO / "recipes/smollm2-135m-ja/cpt.yaml")
    code = main(["check", "--config", cpt, "--accelerate_config", str(REPO / "accelerate_configs/cpu_fsdp2.yaml"),
                 "--json", "--partial_training_fraction", "0.5"])
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert code != 0 and any(p.startswith("partial_training_fraction=0.5 runs on one process; this launch is fsdp")
                             for p in problems), problems


# -- the optimizer: frozen parameters and their Adam state ------------------------------------
def test_frozen_parameters_and_their_adam_state_are_bit_identical_across_the_phase():
    """Plain torch AdamW (weight decay on), the callback's phases: during the 3 partial steps the frozen
    parameters do not move and get no Adam state; the trainable ones move; after the switch everything steps and
    the unfrozen parameters' Adam step count starts at 1."""
    torch.manual_seed(0)
    m = _model(tie=False)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    cb = PartialTraining(m, partial_settings(CptArguments(train_layers_first=1, partial_training_fraction=0.5), 6))
    ids = {id(p) for p in cb.frozen}
    frozen = {n: p for n, p in m.named_parameters() if id(p) in ids}
    assert set(frozen) == {n for n, _ in m.named_parameters()
                           if n.startswith(("model.layers.1.", "model.layers.2.", "model.layers.3.", "model.norm."))}
    start = {n: p.detach().clone() for n, p in m.named_parameters()}
    for step in range(6):
        cb.apply(step)
        ids = torch.randint(0, V, (2, 12))
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 2:  # the end of the partial phase
            for n, p in frozen.items():
                assert torch.equal(p, start[n]) and p not in opt.state, n
            assert not torch.equal(m.model.layers[0].mlp.up_proj.weight, start["model.layers.0.mlp.up_proj.weight"])
            assert not torch.equal(m.lm_head.weight, start["lm_head.weight"])
    assert all(p.requires_grad for p in m.parameters())
    for n, p in frozen.items():
        assert not torch.equal(p, start[n]) and int(opt.state[p]["step"]) == 3, n
    assert int(opt.state[m.lm_head.weight]["step"]) == 6


# -- the real trainer path: frozen phase, report, exact resume --------------------------------
def _cpt_args(model, out, *extra):
    return ["--config", str(REPO / "recipes/smollm2-135m-ja/cpt.yaml"), "--model", model, "--output_dir", out,
            "--tokenizer_mode", "none", "--seq_len", "64", "--train_tokens", "1024", "--eval_max_docs", "8",
            "--loss_implementation", "model", "--logging_steps", "1",
            "--save_steps", "1", "--save_total_limit", "10", "--warmup_steps", "1", "--weight_decay", "0.1",
            "--train_layers_first", "1", "--partial_training_fraction", "0.5", *extra]


def _optimizer_state(ckpt, model_dir):
    """The Adam state of checkpoint ``ckpt`` by parameter name (the Trainer's groups: decayed, then not)."""
    from transformers import AutoModelForCausalLM, Trainer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    decay = set(Trainer.get_decay_parameter_names(None, model))
    names = [n for n, _ in model.named_parameters() if n in decay] + \
        [n for n, _ in model.named_parameters() if n not in decay]
    state = torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=False)["state"]
    return {names[i]: s for i, s in state.items()}


def test_partial_phase_in_a_real_run_and_exact_resume_inside_and_after_it(tmp_path, tiny_model_dir, capsys,
                                                                          monkeypatch):
    """4 steps of the tiny 2-layer model, the first 2 with only the embeddings, the head and layer 0 training.
    Layer 1 and the final norm are bit-identical at steps 1 and 2 and have no Adam state; they move at step 3.
    A run killed after step 1 (inside the phase) and after step 3 (after it), resumed each time, ends with the
    same weights as the uninterrupted run, bit for bit."""
    from safetensors.torch import load_file

    from xlt.cli import run_recipe

    full = str(tmp_path / "full")
    assert run_recipe("cpt", _cpt_args(tiny_model_dir, full)) == 0
    log = capsys.readouterr().out
    assert "partial training for 2 of 4 steps" in log and "partial training done after 2 steps" in log
    with open(os.path.join(full, "report.json"), encoding="utf-8") as f:
        assert json.load(f)["cpt"]["partial_training"] == {"train_layers_first": 1, "train_layers_last": 0,
                                                           "partial_training_fraction": 0.5, "partial_steps": 2}
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    at = {s: load_file(os.path.join(full, f"checkpoint-{s}", "model.safetensors")) for s in (1, 2, 3)}
    frozen = [k for k in start if k.startswith(("model.layers.1.", "model.norm."))]
    assert frozen
    for s in (1, 2):
        state = _optimizer_state(os.path.join(full, f"checkpoint-{s}"), tiny_model_dir)
        for k in frozen:
            assert torch.equal(at[s][k], start[k]) and k not in state, f"{k} at step {s}"
        assert int(state["model.layers.0.mlp.up_proj.weight"]["step"]) == s
    assert not torch.equal(at[2]["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
    state3 = _optimizer_state(os.path.join(full, "checkpoint-3"), tiny_model_dir)
    for k in frozen:
        assert not torch.equal(at[3][k], start[k]) and int(state3[k]["step"]) == 1, k

    # One run killed after step 1 (inside the phase), resumed, killed after step 3 (after it), resumed.
    part, stops = str(tmp_path / "part"), [1, 3]

    def on_save(self, args, state, control, **kwargs):
        if stops and state.global_step == stops[0]:
            stops.pop(0)
            raise KeyboardInterrupt

    monkeypatch.setattr(PartialTraining, "on_save", on_save, raising=False)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            run_recipe("cpt", _cpt_args(tiny_model_dir, part))
    assert run_recipe("cpt", _cpt_args(tiny_model_dir, part)) == 0
    assert not stops
    final = load_file(os.path.join(full, "cpt", "model.safetensors"))
    got = load_file(os.path.join(part, "cpt", "model.safetensors"))
    for k in final:
        assert torch.equal(final[k], got[k]), k


# -- xlt compare: a partial arm is charged what it computes -------------------------------------
def _compare_file(tmp_path, arm_overrides) -> str:
    import yaml

    ja, en = tmp_path / "ja_held.jsonl", tmp_path / "en_held.txt"
    ja.write_text(json.dumps({"text": "吾輩は猫である。"}, ensure_ascii=False) + "\n", encoding="utf-8")
    en.write_text("First Citizen:\nSpeak, speak.\n", encoding="utf-8")
    cfg = {"recipe": str(REPO / "recipes/smollm2-135m-ja/cpt.yaml"), "compute": {"base_train_tokens": 98304},
           "arms": [{"name": "base", "overrides": {"tokenizer_mode": "none"}},
                    {"name": "ls", "overrides": {"tokenizer_mode": "none", **arm_overrides}}],
           "heldout": {"ja": [str(ja)], "en": [str(en)]}}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return str(path)


def test_compare_gives_a_partial_arm_more_tokens_at_equal_flops(tmp_path, no_model_loading):
    """plan_arms with a 2-stage arm (half the steps at 0.6 of the full FLOPs per token): its tokens solve
    budget = 6 N (tokens - partial tokens) + 0.6 * 6 N * partial tokens; the curve's FLOPs follow the phases."""
    from xlt.compare import arm_flops, load_config, plan_arms

    cfg = load_config(_compare_file(tmp_path, {"partial_training_fraction": 0.5}), output_dir=str(tmp_path / "o"))
    n = 1_000_000
    partial = {"train_layers_first": 0, "train_layers_last": 0, "fraction": 0.5, "flops_per_token": 0.6 * 6 * n}
    prepared = {"base": {"params": {"n_eff": n}, "init_flops": 0.0},
                "ls": {"params": {"n_eff": n}, "init_flops": 0.0, "partial": partial}}
    budget, plans = plan_arms(cfg, prepared)
    tps, ls = plans["base"]["tokens_per_step"], plans["ls"]
    assert plans["base"]["steps"] == 98304 // tps and budget == 6 * n * 98304
    # s steps with ceil(s / 2) partial cost 6 N tps (s - 0.4 ceil(s / 2)): equal to the base's 6 N tps S at
    # s = S / 0.8 when S / 0.8 is even
    base_steps = plans["base"]["steps"]
    assert ls["steps"] == round(base_steps / 0.8) and ls["steps"] % 2 == 0, (base_steps, ls)
    assert ls["flops"] == pytest.approx(6 * n * tps * (ls["steps"] - 0.4 * (ls["steps"] // 2)), rel=1e-12)
    assert ls["flops"] == pytest.approx(budget, rel=1e-12)
    half = ls["steps"] // 2 * tps
    assert arm_flops(prepared["ls"], half, ls["steps"], tps) == pytest.approx(0.6 * 6 * n * half)  # in the phase
    assert arm_flops(prepared["ls"], half + tps, ls["steps"], tps) == pytest.approx(0.6 * 6 * n * half + 6 * n * tps)


def test_compare_partial_cost_is_the_hand_count_of_the_arm_model(tmp_path, tiny_model_dir):
    """partial_cost reads the arm's model config (meta device): 2 layers, first 1: layer 0 and the head at 6,
    layer 1 and the final norm at 4."""
    from transformers import AutoConfig

    from xlt.compare import partial_cost

    assert partial_cost(tiny_model_dir, CptArguments()) is None
    got = partial_cost(tiny_model_dir, CptArguments(train_layers_first=1, partial_training_fraction=0.25))
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    head = cfg.vocab_size * H
    assert cfg.num_hidden_layers == 2 and cfg.hidden_size == H
    assert got == {"train_layers_first": 1, "train_layers_last": 0, "fraction": 0.25,
                   "flops_per_token": 6 * (LAYER + head) + 4 * (LAYER + H)}


def test_compare_refuses_a_bad_partial_arm_before_any_model_loads(tmp_path, no_model_loading):
    from xlt.compare import load_config

    with pytest.raises(XltError, match="arm 'ls': train_layers_first=2 needs partial_training_fraction"):
        load_config(_compare_file(tmp_path, {"train_layers_first": 2}), output_dir=str(tmp_path / "o"))


def test_compare_md_names_the_partial_arms_cost_per_token(tmp_path):
    from xlt.compare import summarise, write_outputs

    def row(name, new_tokens, partial=None):
        curve = [{"step": 0, "tokens": 0, "flops": 0.0, "ja_bpc": 6.0, "en_bpc": 3.0},
                 {"step": 4, "tokens": 512, "flops": 1e12, "ja_bpc": 5.0, "en_bpc": 2.5}]
        return {"name": name, "new_tokens": new_tokens, "budget_flops": 1e12, "flops": 1e12, "ja_bpc": 5.0,
                "en_bpc": 2.5, "ja_bpc_step0": 6.0, "en_bpc_step0": 3.0, "ja_chars_per_token": 0.6,
                "chars_per_second": None, "tokens": 512, "curve": curve, "overrides": {}, "n_eff": 1000,
                "partial_training": partial}

    rows = [row("base", 0), row("ls", 0, {"train_layers_first": 2, "train_layers_last": 2, "fraction": 1.0,
                                          "flops_per_token": 4620.0})]
    summarise(rows)
    write_outputs(str(tmp_path), rows, {"ja": ["吾輩は猫である。"], "en": ["Speak."]})
    md = (tmp_path / "compare.md").read_text(encoding="utf-8")
    assert "6 · N_eff · tokens + init (partial-training phases per token: ls 0.770 of 6 · N_eff)" in md
