"""New-row optimisation: the new embedding rows as their own AdamW group, and the new-rows-only warm-up.

The reference for every exactness test is plain torch: an AdamW in which the new rows (and the old rows) are
separate leaf tensors, the new ones in their own group with lr x multiplier and their own weight decay, and in
which, during the warm-up, every other gradient is None (torch then leaves those parameters and their state alone).
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from conftest import REPO, tiny_llama
from xlt.config import CptArguments, XltError
from xlt.train.new_rows import COUNT_KEY, NewRowsSettings, embedding_matrices, new_rows_settings, wrap_new_rows

V = 96
NEW = [7, *range(80, V)]  # not contiguous: an id inside the old range too (a Llama-3 style gap)
LAMBDAS = [0.5, 1.0, 0.7, 0.3, 0.9, 0.6, 0.2]  # the LR schedule changes the lr every step


def _groups(model, lr, wd, extra=()):
    """Trainer-like groups: decay for matrices, none for norms; ``extra`` tensors join the decay group."""
    named = [(n, p) for n, p in model.named_parameters()]
    skip = {id(p) for p in extra}
    decay = [p for n, p in named if "norm" not in n and id(p) not in skip]
    return [{"params": decay, "weight_decay": wd, "lr": lr},
            {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0, "lr": lr}]


def _batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, V, (2, 16), generator=g)


def _loss(model, step):
    x = _batch(step)
    return model(input_ids=x, labels=x).loss


class Reference:
    """Model B trained by a torch AdamW where each embedding matrix's old / new rows are separate leaf tensors."""

    def __init__(self, model, lr, wd, m, wd_new, warmup):
        self.model, self.warmup = model, warmup
        self.mats = embedding_matrices(model)
        new = torch.tensor(NEW)
        old = torch.tensor([i for i in range(V) if i not in NEW])
        self.idx = (old, new)
        self.old = [w.detach()[old].clone().requires_grad_() for w in self.mats]
        self.new = [w.detach()[new].clone().requires_grad_() for w in self.mats]
        groups = _groups(model, lr, wd, extra=self.mats)
        groups[0]["params"] = groups[0]["params"] + self.old
        groups.append({"params": self.new, "weight_decay": wd_new, "lr": lr * m})
        self.frozen = groups[0]["params"] + groups[1]["params"]
        self.opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, foreach=False)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: LAMBDAS[s])

    def step(self, k):
        _loss(self.model, k).backward()
        old, new = self.idx
        for w, o, n in zip(self.mats, self.old, self.new):
            o.grad, n.grad, w.grad = w.grad[old].clone(), w.grad[new].clone(), None
        if k < self.warmup:
            for p in self.frozen:
                p.grad = None
        self.opt.step()
        with torch.no_grad():
            for w, o, n in zip(self.mats, self.old, self.new):
                w[old] = o
                w[new] = n
        self.sched.step()
        self.opt.zero_grad()
        self.model.zero_grad()


def _run_pair(tie, m, wd, wd_new, warmup, fused, steps=6, lr=1e-2, check_step=None):
    a = tiny_llama(V, tie=tie, seed=1)
    b = copy.deepcopy(a)
    ref = Reference(b, lr, wd, m, wd_new, warmup)
    counter = [0]
    inner = torch.optim.AdamW(_groups(a, lr, wd), betas=(0.9, 0.95), eps=1e-8, fused=fused)
    opt = wrap_new_rows(inner, a, NEW, NewRowsSettings(m, wd_new, warmup), step_of=lambda: counter[0])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: LAMBDAS[s])
    for k in range(steps):
        _loss(a, k).backward()
        before = {n: p.detach().clone() for n, p in a.named_parameters()}
        opt.arm()
        opt.step()
        if check_step is not None:
            check_step(k, a, opt, before)
        sched.step()
        opt.zero_grad()
        counter[0] += 1
        ref.step(k)
        for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=f"{n} after step {k + 1}")
    return a, opt


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_new_rows_step_as_their_own_group_with_lr_multiplier_and_decay(tie, fused):
    """Every parameter equals the reference's after each of 6 steps (LR changing every step): the new rows got
    lr x 10 and decay 0.05, the old rows and the body the base group's lr and decay 0.1."""
    a, _ = _run_pair(tie, m=10.0, wd=0.1, wd_new=0.05, warmup=0, fused=fused)
    # Not vacuous: the plain AdamW (the new rows in the base group) ends elsewhere.
    plain = tiny_llama(V, tie=tie, seed=1)
    opt = torch.optim.AdamW(_groups(plain, 1e-2, 0.1), betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: LAMBDAS[s])
    for k in range(6):
        _loss(plain, k).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    w_a, w_p = a.get_input_embeddings().weight, plain.get_input_embeddings().weight
    assert not torch.allclose(w_a[NEW], w_p[NEW], rtol=1e-3, atol=1e-4)


def test_old_rows_decay_as_configured_and_new_rows_do_not_by_default():
    """With zero gradients the only change is decay: old rows x (1 - lr wd), new rows untouched (default 0)."""
    model = tiny_llama(V, tie=False, seed=2)
    inner = torch.optim.AdamW(_groups(model, 0.1, 0.5), betas=(0.9, 0.95))
    opt = wrap_new_rows(inner, model, NEW, NewRowsSettings(2.0, 0.0, 0), step_of=lambda: 0)
    before = [w.detach().clone() for w in embedding_matrices(model)]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.arm()
    opt.step()
    old = [i for i in range(V) if i not in NEW]
    for w, b in zip(embedding_matrices(model), before):
        torch.testing.assert_close(w[old], b[old] * (1 - 0.1 * 0.5))
        assert torch.equal(w[NEW], b[NEW])


def test_warmup_freezes_everything_but_the_new_rows_bit_for_bit():
    """3 warm-up steps of 6: during them every parameter but the new rows (body, old rows, untied head) is
    bit-identical and its Adam state stays at zero; afterwards all of it equals the reference, whose body makes a
    normal first Adam step at step 4."""
    warmup = 3

    def check(k, model, opt, before):
        changed_new = False
        for n, p in model.named_parameters():
            if any(p is w for w in embedding_matrices(model)):
                old = [i for i in range(V) if i not in NEW]
                if k < warmup:
                    assert torch.equal(p[old], before[n][old]), f"old rows of {n} moved in warm-up step {k + 1}"
                    st = opt.state[p]
                    assert float(st["step"]) == 0 and st[COUNT_KEY] == k + 1
                    assert not st["exp_avg"][old].any() and not st["exp_avg_sq"][old].any()
                changed_new |= not torch.equal(p[NEW], before[n][NEW])
            elif k < warmup:
                assert torch.equal(p, before[n]), f"{n} moved in warm-up step {k + 1}"
                st = opt.state[p]
                assert float(st["step"]) == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
            elif k == warmup:
                assert float(opt.state[p]["step"]) == 1  # the body's first real step is Adam's step 1
        assert changed_new

    _run_pair(tie=False, m=5.0, wd=0.1, wd_new=0.0, warmup=warmup, fused=False, check_step=check)
    _run_pair(tie=True, m=1.0, wd=0.0, wd_new=0.0, warmup=warmup, fused=True)


def test_a_skipped_step_leaves_weights_and_new_row_state_untouched():
    from xlt.train.skip_step import SkipStepConfig, SkipStepGuard, SkipStepOptimizer

    model = tiny_llama(V, tie=False, seed=3)
    inner = torch.optim.AdamW(_groups(model, 1e-2, 0.1))
    step = [0]
    opt = wrap_new_rows(inner, model, NEW, NewRowsSettings(10.0, 0.0, 2), step_of=lambda: step[0])
    guard = SkipStepGuard(SkipStepConfig(sigma=0, skip_nonfinite=True))
    skip = SkipStepOptimizer(opt, guard)
    _loss(model, 0).backward()
    opt.arm()
    guard.record_loss(torch.tensor(1.0), 1)
    skip.step()  # taken: warm-up step 1
    skip.zero_grad()
    step[0] += 1
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = copy.deepcopy(inner.state_dict())
    _loss(model, 1).backward()
    opt.arm()
    guard.record_loss(torch.tensor(float("nan")), 2)
    assert skip.step() is None and guard.skipped == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    after = inner.state_dict()
    for pid, st in state["state"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(after["state"][pid][key]), torch.as_tensor(v)), (pid, key)


# -- settings ----------------------------------------------------------------------------------
class _TA:
    def __init__(self, optim="adamw_torch_fused", weight_decay=0.0):
        self.optim, self.weight_decay = optim, weight_decay


@pytest.mark.parametrize("kw, key", [({"new_rows_lr_multiplier": 0}, "new_rows_lr_multiplier"),
                                     ({"new_rows_lr_multiplier": float("nan")}, "new_rows_lr_multiplier"),
                                     ({"new_rows_weight_decay": -0.1}, "new_rows_weight_decay"),
                                     ({"new_rows_warmup_fraction": 1.0}, "new_rows_warmup_fraction"),
                                     ({"new_rows_warmup_fraction": -0.1}, "new_rows_warmup_fraction")])
def test_recipe_keys_are_range_checked(kw, key):
    with pytest.raises(XltError, match=key) as e:
        CptArguments(**kw)
    assert "\n" not in str(e.value)


def test_settings_need_a_tokenizer_change_full_training_and_adamw():
    c = CptArguments(new_rows_lr_multiplier=10.0)
    with pytest.raises(XltError, match="new_rows_lr_multiplier.*tokenizer_mode"):
        new_rows_settings(c, "none", _TA(), 100)
    assert new_rows_settings(CptArguments(), "none", _TA(), 100) is None
    with pytest.raises(XltError, match="new_rows_lr_multiplier.*use_lora"):
        new_rows_settings(c, "extend", _TA(), 100, use_lora=True)
    with pytest.raises(XltError, match="needs optim adamw"):
        new_rows_settings(c, "extend", _TA("adafactor"), 100)
    with pytest.raises(XltError, match="leaving none for the body"):
        new_rows_settings(CptArguments(new_rows_warmup_fraction=0.9), "swap", _TA(), 5)
    s = new_rows_settings(CptArguments(new_rows_warmup_fraction=0.1), "extend", _TA(), 25)
    assert s.active and s.warmup_steps == 3  # ceil(2.5)
    assert not new_rows_settings(CptArguments(), "extend", _TA(), 25).active  # nothing differs
    assert new_rows_settings(CptArguments(), "extend", _TA(weight_decay=0.1), 25).active  # new rows: no decay


def test_bad_keys_fail_before_any_model_loads(tmp_path, no_model_loading, capsys):
    from xlt.cli import run_recipe

    cpt = str(REPO / "recipes/smollm2-135m-ja/cpt.yaml")
    out = str(tmp_path / "r")
    assert run_recipe("cpt", ["--config", cpt, "--output_dir", out, "--tokenizer_mode", "none",
                              "--new_rows_lr_multiplier", "10"]) == 2
    assert run_recipe("cpt", ["--config", cpt, "--output_dir", out, "--new_rows_warmup_fraction", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "tokenizer_mode" in err[0] and "new_rows_warmup_fraction" in err[1]


# -- the real XltTrainer path -------------------------------------------------------------------
def _cpt_args(model, out, *extra):
    return ["--config", str(REPO / "recipes/smollm2-135m-ja/cpt.yaml"), "--model", model, "--output_dir", out,
            "--new_tokens", "64", "--train_tokens", "4096", "--eval_max_docs", "8", "--logging_steps", "1",
            "--save_steps", "1", "--save_total_limit", "10", "--warmup_steps", "1", "--weight_decay", "0.1",
            "--new_rows_lr_multiplier", "10", "--new_rows_warmup_fraction", "0.5", *extra]


def test_warmup_in_a_real_run_and_resume_across_its_boundary(tmp_path, tiny_model_dir, capsys):
    """4 steps, the first 2 new-rows-only. Uninterrupted: nothing but the new rows moves in steps 1-2, the body
    moves at step 3, report.json names the settings. Interrupted after step 1 and resumed: the same weights."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    import xlt.train.cpt as cpt_module
    from xlt.cli import run_recipe

    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert run_recipe("cpt", _cpt_args(tiny_model_dir, full)) == 0
    log = capsys.readouterr().out
    assert "lr x10, weight decay 0; new-rows-only warm-up for 2 of 4 steps" in log
    assert "new-rows warm-up done after 2 steps" in log
    with open(os.path.join(full, "report.json"), encoding="utf-8") as f:
        section = json.load(f)["cpt"]["new_rows"]
    start = load_file(os.path.join(full, "tokenizer", "model.safetensors"))
    n_new = start["model.embed_tokens.weight"].shape[0] - 49152  # the base SmolLM2 vocabulary
    assert section == {"count": n_new, "lr_multiplier": 10.0, "weight_decay": 0.0, "warmup_steps": 2,
                       "own_group": True}
    at = {s: load_file(os.path.join(full, f"checkpoint-{s}", "model.safetensors")) for s in (1, 2, 3)}
    for key, w0 in start.items():
        for s in (1, 2):
            if key == "model.embed_tokens.weight":
                assert torch.equal(at[s][key][:49152], w0[:49152]), f"old rows moved by step {s}"
                # The new rows follow the LR schedule as their own group would: its warm-up gives LR 0 at
                # step 1 (they stay), then they move. (The groups accelerate re-creates in prepare are the
                # ones the scheduler updates; a wrapper holding the groups it was built with missed that.)
                assert torch.equal(at[s][key][49152:], w0[49152:]) == (s == 1), f"new rows at step {s}"
            else:
                assert torch.equal(at[s][key], w0), f"{key} moved by step {s}"
    assert not torch.equal(at[3]["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])

    class StopAt1(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step >= 1:
                raise KeyboardInterrupt

    original = cpt_module.CptTrainer

    class Interrupted(original):
        def __init__(self, *a, **k):
            k["callbacks"] = list(k.get("callbacks") or []) + [StopAt1()]
            super().__init__(*a, **k)

    cpt_module.CptTrainer = Interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            run_recipe("cpt", _cpt_args(tiny_model_dir, part))
    finally:
        cpt_module.CptTrainer = original
    assert run_recipe("cpt", _cpt_args(tiny_model_dir, part)) == 0
    assert "new-rows warm-up done after 2 steps" in capsys.readouterr().out
    a = load_file(os.path.join(full, "cpt", "model.safetensors"))
    b = load_file(os.path.join(part, "cpt", "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_two_processes_train_like_one_with_new_row_settings(tmp_path, tiny_model_dir):
    """torchrun, 2 gloo processes x batch 2 = 1 process x batch 4, across the warm-up boundary: same weights."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from xlt.cli import run_recipe

    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = ["--save_steps", "100"]
    assert run_recipe("cpt", _cpt_args(tiny_model_dir, one, *common, "--per_device_train_batch_size", "4")) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29547", str(REPO / "recipes/cpt.py"),
                           *_cpt_args(tiny_model_dir, two, *common, "--per_device_train_batch_size", "2")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("new-rows warm-up done after 2 steps") == 1  # the main process only
    a = load_file(os.path.join(one, "cpt", "model.safetensors"))
    b = load_file(os.path.join(two, "cpt", "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
