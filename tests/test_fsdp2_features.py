"""xlt's training features with FSDP2 parameters (torch ``fully_shard``, DTensor shards) on 2 gloo processes.

Each test drives the feature's own code under ``torchrun`` (tests/scale_launch.py) with the model sharded as
accelerate's FSDP2 path shards it: every decoder layer, then the root.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

LAUNCH = str(REPO / "tests/scale_launch.py")


def torchrun(mode: str, out, model_dir: str, port: int) -> None:
    from test_scale import sub_env

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), LAUNCH, mode, str(out), model_dir],
                          capture_output=True, text=True, env=sub_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_launched_recipe_stage_leaves_with_its_process_group_destroyed(tmp_path, tiny_model_dir):
    """A gloo group alive at interpreter shutdown can abort a rank (SIGABRT) after its model was saved, failing
    the launch: ``run_recipe`` destroys it (after a barrier) on every rank before returning."""
    torchrun("recipe_teardown", tmp_path, tiny_model_dir, 29563)
    for r in (0, 1):
        assert json.loads((tmp_path / f"teardown-{r}.json").read_text()) == {"rc": 0, "initialized_after": False}


def test_distillation_teacher_is_sharded_under_fsdp_and_gives_the_full_teachers_term(tmp_path, tiny_model_dir):
    """kd_weight under FSDP: the teacher is sharded like the student (each process holds half of it) and the term
    equals the one a full teacher copy gives, with its gradient reaching every student shard."""
    from xlt.config import CptArguments
    from xlt.train.kd import kd_settings

    assert kd_settings(CptArguments(kd_weight=0.5, kd_fraction=0.5), "extend", 8, launcher_kind="fsdp").steps == 4
    torchrun("fsdp_kd", tmp_path, tiny_model_dir, 29561)
    results = [json.loads((tmp_path / f"kd-{r}.json").read_text()) for r in (0, 1)]
    for r in results:
        assert r["all_dtensor"] and r["local_share"] == pytest.approx(0.5, abs=0.01)
        assert r["n"] == r["n_ref"] == 2 * 23 and r["term"] > 0
        # The same fp32 ops on the same all-gathered weights: equal to rounding.
        assert r["term"] == pytest.approx(r["ref"], rel=1e-6)
        assert r["student_grad"]
    assert results[0]["term"] != results[1]["term"]  # each process scored its own batch


def test_lora_init_is_the_same_on_every_process_whatever_its_random_state():
    """Under FSDP2 each process keeps its own shard of LoRA A as it drew it (no broadcast from rank 0, as DDP
    does): the draw must come from the run's seed, not from the process's random state."""
    import torch

    from conftest import tiny_llama
    from xlt.train.lora import LoraSettings, apply_lora

    drawn = []
    for process_state in (1, 2):  # two processes that consumed random numbers differently before
        model = tiny_llama(96, tie=False)
        torch.manual_seed(process_state)
        torch.rand(process_state)
        state = torch.get_rng_state()
        model = apply_lora(model, LoraSettings(use_lora=True, lora_r=4), [90, 91], seed=42)
        drawn.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n})
        assert torch.equal(torch.get_rng_state(), state), "the process's own random stream is left as it was"
    assert drawn[0] and drawn[0].keys() == drawn[1].keys()
    assert all(torch.equal(drawn[0][n], drawn[1][n]) for n in drawn[0])
