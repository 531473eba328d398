"""FSDP2 on the CPU through xlt's own launch path (accelerate_configs/cpu_fsdp2.yaml): 2 gloo processes whose
parameters are DTensor shards (torch's fully_shard, applied by accelerate inside transformers' Trainer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

CPT = str(REPO / "recipes/smollm2-135m-ja/cpt.yaml")
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
SHARDED_LINE = "[xlt] FSDP2: 20 of 20 trainable parameters are DTensor shards"  # the tiny Llama: 20 tensors


def sub_env(**extra: str) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", **extra)


def launch(config: str, port: int, script: str, *args: str) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file accelerate_configs/CONFIG SCRIPT ARGS`` (2 processes), checked."""
    proc = subprocess.run([ACCELERATE, "launch", "--config_file", str(REPO / "accelerate_configs" / config),
                           "--main_process_port", str(port), script, *args],
                          capture_output=True, text=True, env=sub_env(), cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def report(out: str) -> dict:
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        return json.load(f)


def test_cpu_fsdp2_launch_trains_dtensor_shards_and_saves_a_reloadable_model(tmp_path, tiny_model_dir):
    """accelerate 1.16 alone runs this launch as MULTI_CPU data parallel (no shard anywhere, report "fsdp")."""
    out = str(tmp_path / "run")
    proc = launch("cpu_fsdp2.yaml", 29571, str(REPO / "recipes/cpt.py"),
                  "--config", CPT, "--model", tiny_model_dir, "--output_dir", out, "--tokenizer_mode", "none",
                  "--train_tokens", "4096", "--per_device_train_batch_size", "2", "--save_steps", "2",
                  "--logging_steps", "1", "--eval_max_docs", "8")
    # Logged by the check that stops an FSDP launch whose prepared model or optimizer holds no DTensor shard.
    assert proc.stdout.count(SHARDED_LINE + "; the optimizer steps 20 sharded parameters") == 1
    cpt = report(out)["cpt"]
    assert cpt["launcher"] == "fsdp2" and cpt["world_size"] == 2 and cpt["sharded_parameters"] == 20
    assert cpt["steps"] == 4 and cpt["replicas_in_sync"] is None  # nothing replicated: every parameter sharded
    assert os.path.isdir(os.path.join(out, "checkpoint-4", "pytorch_model_fsdp_0"))  # FSDP's sharded checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "cpt"))
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    sd = model.state_dict()
    assert sd.keys() == start.keys()
    assert all(sd[k].shape == start[k].shape for k in sd)
    assert not all(sd[k].equal(start[k]) for k in sd)  # trained (the gathered save is the full, updated model)
