"""The skip-step guard: its rule on one process (tiny model, real AdamW), and the real CPT path under
2 gloo processes where only rank 1 sees the bad batch (xlt/train/skip_step.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from xlt.config import CptArguments, XltError
from xlt.train.skip_step import (
    SkipStepCallback,
    SkipStepConfig,
    SkipStepGuard,
    SkipStepOptimizer,
    SkipStepState,
    check_backend,
)


class Run:
    """A tiny model under a real AdamW wrapped by the guard, stepped the way the Trainer steps it."""

    def __init__(self, clip: bool = True, **cfg) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.guard = SkipStepGuard(SkipStepConfig(**cfg))
        self.opt = SkipStepOptimizer(torch.optim.AdamW(self.model.parameters(), lr=1e-2), self.guard)
        self.clip = clip
        self.gen = torch.Generator().manual_seed(1)

    def step(self, scale: float = 1.0, micro: int = 2, grad_hook=None) -> bool:
        """One optimizer step over ``micro`` micro-batches whose loss is multiplied by ``scale``; True if skipped."""
        for _ in range(micro):
            x = torch.randn(4, 8, generator=self.gen)
            loss = (self.model(x).pow(2).mean() + 1.0) * scale
            (loss / micro).backward()
            self.guard.record_loss(loss.detach())
        if grad_hook:
            grad_hook(self.model)
        if self.clip:
            self.guard.record_grad_norm(torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0))
        self.opt.step()
        self.opt.zero_grad()
        return self.opt.last_verdict.skip

    def snapshot(self) -> tuple[dict, dict]:
        params = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        opt = {k: {n: v.clone() for n, v in s.items()} for k, s in self.opt.state_dict()["state"].items()}
        return params, opt


def assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], dict):
                assert x[k].keys() == y[k].keys()
                assert all(torch.equal(x[k][n], y[k][n]) for n in x[k])
            else:
                assert torch.equal(x[k], y[k])


def test_a_spike_is_skipped_and_leaves_weights_and_adam_state_bit_identical():
    run = Run(min_history=5, window=16)
    assert not any(run.step() for _ in range(8))  # normal steps are taken...
    before = run.snapshot()
    history = list(run.guard.losses)
    assert run.step(scale=1e3)  # ...a 1000x loss is not
    assert_same(before, run.snapshot())  # weights, exp_avg, exp_avg_sq and the step count all untouched
    assert list(run.guard.losses) == history and run.guard.skipped == 1
    assert "loss" in run.guard.last_skip["reason"] and "threshold" in run.guard.last_skip["reason"]
    assert not run.step()  # the next normal step is judged against an unpoisoned history and taken
    assert not torch.equal(before[0]["0.weight"], run.model[0].weight)


@pytest.mark.parametrize("clip", [True, False])
def test_the_guard_makes_exactly_one_all_reduce_per_optimizer_step(tmp_path, monkeypatch, clip):
    """Under a (1-process gloo) process group: every collective the guard issues over 6 steps of 3 micro-batches,
    a skipped one among them, is counted: one all-reduce per optimizer step, none per micro-batch."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    calls = []
    try:
        for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list",
                     "reduce", "barrier"):
            real = getattr(dist, name)
            monkeypatch.setattr(dist, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
        run = Run(clip=clip, min_history=3, window=8)
        skipped = [run.step(micro=3, scale=1e4 if k == 4 else 1.0) for k in range(6)]
    finally:
        dist.destroy_process_group()
    assert skipped == [False] * 4 + [True, False]
    assert calls == ["all_reduce"] * 6


def test_a_gradient_norm_spike_alone_is_skipped():
    run = Run(min_history=5)
    for _ in range(8):
        run.step()

    def spike(model):
        for p in model.parameters():
            p.grad.mul_(1e3)

    assert run.step(grad_hook=spike)
    assert run.guard.last_skip["reason"].startswith("grad_norm")


def test_nan_loss_is_skipped_before_min_history_and_never_enters_it():
    run = Run(min_history=20)
    run.step()
    before = run.snapshot()
    assert run.step(scale=float("nan"))  # the 2nd step: far below min_history, skipped all the same
    assert_same(before, run.snapshot())
    assert all(math.isfinite(x) for x in run.guard.losses + run.guard.grad_norms)
    assert len(run.guard.losses) == 1
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


@pytest.mark.parametrize("clip", [True, False], ids=["clipper-norm", "no-norm-local-check"])
def test_an_inf_gradient_with_a_finite_loss_is_skipped(clip):
    run = Run(clip=clip)
    run.step()
    before = run.snapshot()

    def inf_grad(model):
        model[2].bias.grad.fill_(float("inf"))

    assert run.step(grad_hook=inf_grad)
    assert_same(before, run.snapshot())
    assert "non-finite" in run.guard.last_skip["reason"]


def test_nonfinite_steps_are_taken_when_skip_nonfinite_is_off_but_stay_out_of_the_history():
    run = Run(skip_nonfinite=False, sigma=0)
    run.step()
    assert not run.step(scale=float("nan"))
    assert len(run.guard.losses) == 1 and run.guard.skipped == 0


def test_spike_factor_ratio_rule_still_works_alone():
    run = Run(sigma=0, spike_factor=3.0, min_history=3)
    for _ in range(4):
        assert not run.step(scale=1.0)
    assert not run.step(scale=2.0)  # 2x the mean: under the factor
    assert run.step(scale=10.0)
    assert "spike_factor 3" in run.guard.last_skip["reason"]


def test_consecutive_skips_request_a_save_and_a_stop():
    from transformers import TrainerControl

    run = Run(max_consecutive=3)
    run.step()
    nan = float("nan")
    assert run.step(scale=nan) and run.step(scale=nan) and not run.guard.stop_requested
    assert not run.step()  # a taken step resets the count
    assert run.step(scale=nan) and run.step(scale=nan)
    assert not run.guard.stop_requested
    control = SkipStepCallback(run.guard).on_step_end(None, None, TrainerControl())
    assert not control.should_training_stop
    assert run.step(scale=nan) and run.guard.stop_requested
    control = SkipStepCallback(run.guard).on_step_end(None, None, TrainerControl())
    assert control.should_save and control.should_training_stop
    msg = run.guard.stop_message("/runs/x", 7)
    assert "\n" not in msg and "step 7" in msg and "3 consecutive" in msg and "/runs/x/checkpoint-7" in msg
    never = Run(max_consecutive=0)
    assert all(never.step(scale=nan) for _ in range(12)) and not never.guard.stop_requested


def test_state_round_trips_through_json_and_gives_the_same_decisions():
    run = Run(min_history=4)
    for scale in (1, 1, float("nan"), 1, 1, 1, 1e3, 1):
        run.step(scale=scale)
    saved = json.loads(json.dumps(run.guard.state_dict()))
    assert SkipStepState.from_dict(saved) == run.guard.state
    restored = SkipStepGuard(run.guard.config)
    restored.load_state_dict(saved)
    assert restored.state == run.guard.state and restored.skipped == 2
    for value in (1e3, 1.0):
        a = run.guard.decide(value, 1.0, False, step=20)
        b = restored.decide(value, 1.0, False, step=20)
        assert (a.skip, a.reason) == (b.skip, b.reason)
    old = SkipStepState.from_dict({"history": [1.0, 2.0], "skipped": 3})  # the old SpikeGuard's checkpoints
    assert old.loss_history == [1.0, 2.0] and old.skipped == 3


def test_recipe_keys_are_checked_at_parse_time():
    from xlt.config import parse_recipe

    args = CptArguments()
    assert (args.skip_step_sigma, args.skip_step_window, args.skip_step_min_history, args.max_consecutive_skips,
            args.skip_nonfinite) == (6.0, 128, 64, 10, True)
    cfg = SkipStepConfig.from_args(CptArguments(skip_step_sigma=0, spike_factor=0, skip_nonfinite=False))
    assert not cfg.enabled
    for bad, key in (({"skip_step_min_history": 1}, "skip_step_min_history"),
                     ({"skip_step_window": 8, "skip_step_min_history": 9}, "skip_step_min_history"),
                     ({"skip_step_sigma": -1}, "skip_step_sigma"), ({"spike_factor": 0.5}, "spike_factor"),
                     ({"max_consecutive_skips": -1}, "max_consecutive_skips")):
        with pytest.raises(XltError, match=key):
            CptArguments(**bad)
    with pytest.raises(XltError, match="skip_step_window=1"):
        parse_recipe([CptArguments], ["--skip_step_window", "1"])


def test_deepspeed_with_the_guard_on_is_refused_at_trainer_setup(tiny_model_dir, tmp_path):
    from transformers import TrainingArguments

    from xlt.train.trainer import CptTrainer

    trainer = CptTrainer(model=torch.nn.Linear(2, 2), args=TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1), guard=SkipStepGuard(SkipStepConfig()))
    trainer.is_deepspeed_enabled = True  # what the Trainer sets when accelerate runs DeepSpeed
    with pytest.raises(XltError, match="not supported under DeepSpeed"):
        trainer.train()
    check_backend(trainer, SkipStepGuard(SkipStepConfig(sigma=0, skip_nonfinite=False)))  # guard off: allowed


# ---------------------------------------------------------------------------------------------
# The acceptance test: 2 gloo processes, the real CPT path, a bad micro-batch on rank 1 only
# ---------------------------------------------------------------------------------------------
def test_two_processes_skip_together_when_only_rank_1_sees_the_bad_batch(tmp_path, tiny_model_dir):
    """Step 2: NaN on rank 1 (before min_history); step 6: loss x 1e4 on rank 1; from step 9: NaN every step.

    Both ranks skip steps 2 and 6 with weights and Adam state bit-identical to before, equal across ranks; three
    skips in a row (9, 10, 11) save checkpoint-11 and stop both ranks with one `xlt: error:` line, status 2;
    every rank's guard state equals the one rank 0 saved.
    """
    out, dump = tmp_path / "run", tmp_path / "dump"
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
           str(REPO / "accelerate_configs/cpu_multi.yaml"), "--main_process_port", "29547",
           str(REPO / "tests/skip_step_launch.py"), str(dump), "2:nan,6:spike,9+:nan",
           "--config", str(REPO / "recipes/smollm2-135m-ja/cpt.yaml"), "--model", tiny_model_dir,
           "--output_dir", str(out), "--tokenizer_mode", "none", "--train_tokens", str(16 * 512),
           "--per_device_train_batch_size", "1", "--save_steps", "100", "--logging_steps", "2",
           "--eval_max_docs", "8", "--skip_step_min_history", "3", "--skip_step_sigma", "50",
           "--max_consecutive_skips", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    log = proc.stdout + proc.stderr
    assert [(dump / f"rc_rank{r}.txt").read_text() for r in (0, 1)] == ["2", "2"], log[-4000:]

    for step in (2, 6):
        snaps = {(w, r): torch.load(dump / f"{w}_step{step}_rank{r}.pt") for w in ("before", "after") for r in (0, 1)}
        for r in (0, 1):
            assert_same(tuple(snaps["before", r].values()), tuple(snaps["after", r].values()))
        assert_same(tuple(snaps["after", 0].values()), tuple(snaps["after", 1].values()))
        assert all(torch.isfinite(p).all() for p in snaps["after", 1]["params"].values())
    # Steps 3-5 were taken (the test is not vacuous): weights moved between the two skipped steps.
    a = torch.load(dump / "after_step2_rank0.pt")["params"]
    b = torch.load(dump / "before_step6_rank0.pt")["params"]
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert "'skipped_steps': 2" in log  # the Trainer log at step 8

    errors = [line for line in log.splitlines() if line.startswith("xlt: error:")]
    assert errors and len(set(errors)) == 1, log[-4000:]  # each rank: the same single line
    assert "step 11" in errors[0] and "3 consecutive" in errors[0] and "checkpoint-11" in errors[0]
    ckpt = out / "checkpoint-11"
    assert (ckpt / "xlt_state.json").is_file() and not (out / "cpt").exists()
    saved = json.loads((ckpt / "xlt_state.json").read_text())["guard"]
    assert saved["skipped"] == 5 and saved["consecutive"] == 3
    for r in (0, 1):  # the guard state is the same on every rank, so rank 0's file is right for all
        assert json.loads((dump / f"guard_step11_rank{r}.json").read_text()) == saved


def test_distributed_checkpoint_resume_keeps_adam_state_and_counts_no_skip():
    """torch's get/set_optimizer_state_dict (the FSDP2 resume path) step the optimizer with nothing recorded to
    create its state: the wrapper must pass that through, or the Adam moments are silently dropped."""
    import copy

    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from xlt.train.skip_step import SkipStepConfig, SkipStepGuard, SkipStepOptimizer

    torch.manual_seed(0)
    trained = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    trained(torch.randn(2, 4)).sum().backward()
    opt.step()
    saved = get_optimizer_state_dict(trained, opt)

    fresh = torch.nn.Linear(4, 4)
    guard = SkipStepGuard(SkipStepConfig())
    wrapped = SkipStepOptimizer(torch.optim.AdamW(fresh.parameters(), lr=1e-3), guard)
    template = get_optimizer_state_dict(fresh, wrapped)
    assert set(template["state"]) == set(saved["state"]), "the template must hold every parameter's state"
    loaded = copy.deepcopy(template)  # what DCP does: fill the template's keys from the checkpoint
    for k in loaded["state"]:
        loaded["state"][k] = saved["state"][k]
    loaded["param_groups"] = saved["param_groups"]
    set_optimizer_state_dict(fresh, wrapped, loaded)
    inner = wrapped.optimizer.state
    assert len(inner) == 2 and guard.skipped == 0 and guard.consecutive == 0
    for p_fresh, p_saved in zip(fresh.parameters(), trained.parameters()):
        torch.testing.assert_close(inner[p_fresh]["exp_avg"], opt.state[p_saved]["exp_avg"])
