"""FSDP2 on the CPU through xlt's own launch path (accelerate_configs/cpu_fsdp2.yaml): 2 gloo processes whose
parameters are DTensor shards (torch's fully_shard, applied by accelerate inside transformers' Trainer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

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


def test_cpu_fsdp2_launch_trains_dtensor_shards_skips_together_and_saves_a_reloadable_model(tmp_path, tiny_model_dir):
    """accelerate 1.16 alone runs this launch as MULTI_CPU data parallel (no shard anywhere, report "fsdp").

    Through tests/skip_step_launch.py: rank 1 alone sees a NaN loss at step 2, and the skip-step guard (which
    wraps the optimizer before accelerate swaps in the shards) skips it on both ranks, leaving each rank's
    weight shards and Adam state bit-identical."""
    out, dump = str(tmp_path / "run"), tmp_path / "dump"
    proc = launch("cpu_fsdp2.yaml", 29571, str(REPO / "tests/skip_step_launch.py"), str(dump), "2:nan",
                  "--config", CPT, "--model", tiny_model_dir, "--output_dir", out, "--tokenizer_mode", "none",
                  "--train_tokens", "4096", "--per_device_train_batch_size", "2", "--save_steps", "2",
                  "--logging_steps", "1", "--eval_max_docs", "8")
    # Logged by the check that stops an FSDP launch whose prepared model or optimizer holds no DTensor shard.
    assert proc.stdout.count(SHARDED_LINE + "; the optimizer steps 20 sharded parameters") == 1
    cpt = report(out)["cpt"]
    assert cpt["launcher"] == "fsdp2" and cpt["world_size"] == 2 and cpt["sharded_parameters"] == 20
    assert cpt["steps"] == 4 and cpt["replicas_in_sync"] is None  # nothing replicated: every parameter sharded
    assert cpt["skipped_steps"] == 1 and "step 2 skipped: non-finite loss" in proc.stdout
    assert os.path.isdir(os.path.join(out, "checkpoint-4", "pytorch_model_fsdp_0"))  # FSDP's sharded checkpoint
    snaps = {(w, r): torch.load(dump / f"{w}_step2_rank{r}.pt", weights_only=False)
             for w in ("before", "after") for r in (0, 1)}
    from transformers import AutoConfig

    emb = "model.embed_tokens.weight"
    rows = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    for r in (0, 1):  # the dumps hold each rank's local shard of every parameter
        params, after = snaps["before", r]["params"], snaps["after", r]["params"]
        assert params[emb].shape[0] * 2 == rows  # half of the rows: a shard, not a replica
        assert all(torch.equal(p, after[n]) for n, p in params.items())
        opt_b, opt_a = snaps["before", r]["optimizer"], snaps["after", r]["optimizer"]
        assert opt_b.keys() == opt_a.keys() and len(opt_b) == 20
        for k, st in opt_b.items():
            for name, v in st.items():
                v, w = (getattr(x, "_local_tensor", x) for x in (v, opt_a[k][name]))
                assert torch.equal(v, w), (k, name)
    assert not torch.equal(snaps["after", 0]["params"][emb], snaps["after", 1]["params"][emb])  # each its own half
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    # The tied head is written once, as for an unsharded model (gathered, it is a second full copy).
    saved = load_file(os.path.join(out, "cpt", "model.safetensors"))
    assert saved.keys() == load_file(os.path.join(tiny_model_dir, "model.safetensors")).keys()
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "cpt"))
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    sd = model.state_dict()
    assert sd.keys() == start.keys()
    assert all(sd[k].shape == start[k].shape for k in sd)
    assert not all(sd[k].equal(start[k]) for k in sd)  # trained (the gathered save is the full, updated model)


# ---------------------------------------------------------------------------------------------------------
# The new-rows AdamW wrapper under FSDP2 (it is built before accelerate swaps in the sharded parameters)
# ---------------------------------------------------------------------------------------------------------
def test_new_rows_wrapper_steps_after_accelerates_fsdp2_parameter_swap(tmp_path):
    """torchrun, no launcher: wrapper on a tiny untied Llama, fully_shard per layer + root, the optimizer's params
    swapped as accelerate's prepare swaps them, one backward, step(). It raised KeyError: 'exp_avg'.

    Tolerance 1e-5 against an unsharded reference (AdamW per group, whole batch): the sharded run averages two
    half-batch gradients (another summation order, ~1 ulp); a first Adam step is lr * g / (|g| + eps), which an
    ulp of g moves by far less than 1e-5 at the new rows' LR 0.1 unless |g| ~ eps, and measured it is 4.3e-6."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29572", str(REPO / "tests/fsdp_launch.py"), "new_rows_swap", str(tmp_path)],
                          capture_output=True, text=True, env=sub_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        with open(tmp_path / f"swap-{rank}.json", encoding="utf-8") as f:
            r = json.load(f)
        assert r["step"] == "ok"
        assert r["embedding_is_dtensor"] and r["local_rows"] == [48, 48]  # 96 rows sharded in halves
        assert r["max_abs_diff"] < 1e-5


NEW_ROWS = ("--tokenizer_mode", "extend", "--new_tokens", "64", "--train_tokens", "4096",
            "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2", "--weight_decay", "0.1",
            "--new_rows_lr_multiplier", "10", "--new_rows_warmup_fraction", "0.5", "--warmup_steps", "1",
            "--save_steps", "100", "--logging_steps", "1", "--eval_max_docs", "8")


def test_cpu_fsdp2_new_rows_run_equals_the_ddp_run(tmp_path, tiny_model_dir):
    """Tokenizer extension, weight decay 0.1 (the wrapper is on), new rows at 10x LR with a new-rows-only
    warm-up, 2 micro-batches per step: under cpu_fsdp2 the same final model as under cpu_multi (DDP).

    Tolerance rtol 1e-4 / atol 1e-5 (fp32): DDP all-reduces and FSDP2 reduce-scatters the same gradients in
    another order (ulps), which reach the weights only through Adam's normalised update; an Adam step moves a
    weight by about its LR (1e-4 for the body, 1e-3 for the new rows), so a wrong row treatment (no multiplier,
    decayed new rows, a body moved during the warm-up) is 10-100x outside the tolerance."""
    fsdp, ddp = str(tmp_path / "fsdp"), str(tmp_path / "ddp")
    args = ("--config", CPT, "--model", tiny_model_dir, *NEW_ROWS)
    proc = launch("cpu_fsdp2.yaml", 29574, str(REPO / "recipes/cpt.py"), *args, "--output_dir", fsdp)
    assert SHARDED_LINE in proc.stdout and "new-rows warm-up done after 2 steps" in proc.stdout
    launch("cpu_multi.yaml", 29575, str(REPO / "recipes/cpt.py"), *args, "--output_dir", ddp)
    a, b = report(fsdp)["cpt"], report(ddp)["cpt"]
    assert (a["launcher"], b["launcher"]) == ("fsdp2", "ddp") and a["world_size"] == b["world_size"] == 2
    assert a["new_rows"] == b["new_rows"] and a["new_rows"]["own_group"] and a["steps"] == b["steps"] == 4
    from safetensors.torch import load_file

    wa = load_file(os.path.join(fsdp, "cpt", "model.safetensors"))
    wb = load_file(os.path.join(ddp, "cpt", "model.safetensors"))
    start = load_file(os.path.join(fsdp, "tokenizer", "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    emb = "model.embed_tokens.weight"
    assert not torch.equal(wa[emb][49152:], start[emb][49152:])  # the new rows trained


# ---------------------------------------------------------------------------------------------------------
# FSDP2 + gradient accumulation: reduce-scatter every micro-batch, in fp32
# ---------------------------------------------------------------------------------------------------------
def test_cpu_fsdp2_reduce_scatters_every_micro_batch_in_fp32(tmp_path, tiny_model_dir):
    """bf16 compute, 2 micro-batches per step. Before: the first micro-batch of each step ran under no_sync
    (no reduce-scatter, no sharded gradient: a full unsharded bf16 gradient held across the window) and
    accelerate's policy reduced in bf16."""
    out = str(tmp_path / "run")
    launch("cpu_fsdp2.yaml", 29576, str(REPO / "tests/fsdp_launch.py"), "probe", str(tmp_path), "cpt", "--",
           "--config", CPT, "--model", tiny_model_dir, "--output_dir", out, "--tokenizer_mode", "none",
           "--train_tokens", "2048", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
           "--bf16", "true", "--save_steps", "100", "--logging_steps", "1", "--eval_max_docs", "8")
    for rank in (0, 1):
        with open(tmp_path / f"probe-{rank}.json", encoding="utf-8") as f:
            p = json.load(f)
        assert p["micro_batches"] == 4  # 2 steps x 2 micro-batches
        per_micro = [sorted({d for m, d in p["reduce_scatter"] if m == i}) for i in range(4)]
        assert per_micro == [["float32"]] * 4, per_micro  # every micro-batch reduces, only in fp32
        assert p["grads_after_micro_batch"] == [20, 20]  # sharded gradients exist after the first micro-batch
    assert report(out)["cpt"]["launcher"] == "fsdp2"


def test_gpu_fsdp2_configs_get_the_same_reduction_settings(monkeypatch):
    """fsdp2.yaml / multi_node_fsdp2.yaml (no CPU): the Trainer's accelerator gets sync_each_batch and a policy
    computing in bf16 and reducing in fp32 (accelerate's own policy for bf16 reduces in bf16)."""
    from accelerate.utils import FullyShardedDataParallelPlugin, GradientAccumulationPlugin
    from transformers import TrainingArguments

    from xlt.train.fsdp import setup_fsdp
    from xlt.train.runtime import Launcher

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` exports from these configs
    monkeypatch.setenv("FSDP_VERSION", "2")
    for config in ("fsdp2.yaml", "multi_node_fsdp2.yaml"):
        launcher = Launcher.from_config_file(str(REPO / "accelerate_configs" / config))
        assert launcher.name == "fsdp2" and not launcher.use_cpu
        args = TrainingArguments(output_dir="/tmp/unused", use_cpu=True, bf16=True, gradient_accumulation_steps=16)
        args.use_cpu = False  # parsed as on the GPU machine (bf16 needs use_cpu to parse on this one)
        assert "float32" in setup_fsdp(args, launcher)
        plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)  # as the Trainer builds it
        policy = plugin.mixed_precision_policy
        assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
        grad_acc = GradientAccumulationPlugin(**args.accelerator_config.gradient_accumulation_kwargs)
        assert grad_acc.sync_each_batch and plugin.fsdp_version == 2


def test_cpu_fsdp_with_one_process_is_one_line_before_any_model_loads(tmp_path, tiny_model_dir, monkeypatch,
                                                                       no_model_loading, capsys):
    from xlt.cli import run_recipe

    for name, value in (("ACCELERATE_USE_FSDP", "true"), ("FSDP_VERSION", "2"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)  # accelerate launch --num_processes 1 --config_file cpu_fsdp2.yaml
    rc = run_recipe("cpt", ["--config", CPT, "--model", tiny_model_dir, "--output_dir", str(tmp_path / "run"),
                            "--tokenizer_mode", "none", "--train_tokens", "2048"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "FSDP on the CPU needs 2 or more processes" in err[0], err
