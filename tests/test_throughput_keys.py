"""Throughput keys (issue 15, item 6): per-block compile, selective activation checkpointing, HSDP, float8.

Each key is checked by ``xlt check`` with one-line refusals; what can run on a CPU runs here: selective
checkpointing (which layers recompute, counted), a CPT run with the blocks compiled by inductor's CPU backend and
every other layer checkpointed, the HSDP mesh of the shipped multi-node config as accelerate launches it. float8
needs torchao and an H100-class GPU: here only its refusals run (torchao is not installed on this machine).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import REPO, tiny_llama
from xlt import check
from xlt.cli import main, run_recipe
from xlt.train.runtime import Launcher, checkpoint_every

MULTI_NODE = str(REPO / "accelerate_configs" / "multi_node_fsdp2.yaml")
H100 = ["--offline", "--gpus", "8", "--gpu-memory-gb", "80"]


def _check(capsys, *argv: str) -> tuple[int, dict]:
    rc = main(["check", *argv, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def _recipe(tmp_path: Path, name: str, **changes) -> str:
    data = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text(encoding="utf-8"))
    data.update({"output_dir": str(tmp_path / "run"), **changes})
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name.replace('/', '-')}.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------
# Selective activation checkpointing
# ---------------------------------------------------------------------------------------------
def _forward_counts(model, n_layers: int) -> Counter:
    """How many times each layer's MLP ran in one forward + backward (2 = recomputed: checkpointed).

    Counted in ``forward`` itself: the checkpoint's recompute runs no module hooks."""
    calls: Counter = Counter()
    for i, layer in enumerate(model.model.layers[:n_layers]):
        def counted(*args, _forward=layer.mlp.forward, _i=i, **kwargs):
            calls.update([_i])
            return _forward(*args, **kwargs)

        layer.mlp.forward = counted
    ids = torch.randint(0, 100, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    return calls


@pytest.mark.parametrize("every, expected", [(2, [0, 2, 4]), (3, [0, 3]), (1, [0, 1, 2, 3, 4])])
def test_exactly_layers_0_k_2k_are_checkpointed(every, expected):
    model = tiny_llama(100, layers=5).train()
    args = SimpleNamespace(activation_checkpointing=True, gradient_checkpointing=True)
    env: dict = {}
    assert checkpoint_every(model, every, args, Launcher(kind="fsdp", world_size=2, fsdp_version=2), env) == expected
    # The Trainer's and FSDP's all-layer checkpointing are off, so neither re-enables every layer.
    assert not args.activation_checkpointing and not args.gradient_checkpointing
    assert env == {"FSDP_ACTIVATION_CHECKPOINTING": "false"}
    calls = _forward_counts(model, 5)
    assert sorted(i for i, n in calls.items() if n == 2) == expected
    assert all(calls[i] == 1 for i in range(5) if i not in expected)


def test_checkpointing_every_k_gives_the_same_gradients():
    ids = torch.randint(0, 100, (2, 16))
    grads = []
    for every in (0, 2):
        model = tiny_llama(100, layers=4).train()
        if every:
            checkpoint_every(model, every, SimpleNamespace(activation_checkpointing=False), Launcher(kind="single"), {})
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_compile_blocks_asks_accelerate_for_regional_compilation(monkeypatch):
    from accelerate.utils import TorchDynamoPlugin

    from xlt.train.runtime import compile_blocks

    for key in ("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "ACCELERATE_DYNAMO_BACKEND"):
        monkeypatch.delenv(key, raising=False)
    args = SimpleNamespace(torch_compile=False, torch_compile_backend=None, torch_compile_mode=None)
    env: dict = {}
    assert compile_blocks(args, env)
    assert args.torch_compile and args.torch_compile_backend == "inductor"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # The plugin the Trainer builds from these arguments (transformers' Trainer.create_accelerator_and_postprocess).
    plugin = TorchDynamoPlugin(backend=args.torch_compile_backend, mode=args.torch_compile_mode)
    assert plugin.use_regional_compilation is True and plugin.backend.value == "INDUCTOR"


# ---------------------------------------------------------------------------------------------
# A CPT run with the blocks compiled (inductor, CPU) and every other layer checkpointed
# ---------------------------------------------------------------------------------------------
def test_cpt_with_compiled_blocks_and_selective_checkpointing(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = str(tmp_path / "run")
    path = _recipe(tmp_path, "smollm2-135m-ja/cpt", model=tiny_model_dir, tokenizer_mode="none", train_tokens=2048,
                   save_steps=100, logging_steps=1, eval_max_docs=4, slw_min_len=None, compile_blocks=True,
                   activation_checkpointing_every=2, torch_dtype="float32")
    assert run_recipe("cpt", ["--config", path]) == 0
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        cpt = json.load(f)["cpt"]
    assert cpt["activation_checkpointing"] == "every 2"
    assert cpt["throughput"] == {"compile_blocks": True, "checkpointed_layers": [0], "float8_linears": 0}
    # accelerate compiled the decoder blocks (graphs were captured), not nothing.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    # The saved model has plain parameter names (no torch.compile wrapper prefix) and reloads.
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "cpt"))
    assert not [k for k in model.state_dict() if "_orig_mod" in k]
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# xlt check: refusals, one line each
# ---------------------------------------------------------------------------------------------
def test_check_refuses_float8_without_torchao_or_gpu(tmp_path, capsys, monkeypatch):
    recipe = _recipe(tmp_path, "llama2-7b-ja/cpt", float8=True)
    monkeypatch.setattr(check, "importable", lambda pkg: pkg != "torchao")
    rc, r = _check(capsys, "--config", recipe, "--accelerate_config", str(REPO / "accelerate_configs/fsdp2.yaml"),
                   *H100)
    assert rc == 1 and [p for p in r["problems"] if p.startswith("float8: true needs the torchao package")]
    monkeypatch.setattr(check, "importable", lambda pkg: True)
    rc, r = _check(capsys, "--config", recipe, "--accelerate_config", str(REPO / "accelerate_configs/fsdp2.yaml"),
                   *H100)
    assert rc == 0 and r["throughput"]["float8"], r["problems"]
    rc, r = _check(capsys, "--config", _recipe(tmp_path / "c", "smollm2-135m-ja/cpt", float8=True), "--offline",
                   "--gpus", "0")
    assert [p for p in r["problems"] if p.startswith("float8: true needs an H100-class CUDA GPU")], r["problems"]
    rc, r = _check(capsys, "--config", _recipe(tmp_path / "l", "llama2-7b-ja/sft", float8=True, use_lora=True),
                   "--accelerate_config", str(REPO / "accelerate_configs/fsdp2.yaml"), *H100)
    assert [p for p in r["problems"] if p.startswith("float8: true with LoRA")], r["problems"]


def test_float8_is_refused_before_the_model_loads(tmp_path, tiny_model_dir, capsys, no_model_loading):
    path = _recipe(tmp_path, "smollm2-135m-ja/cpt", model=tiny_model_dir, float8=True)
    assert run_recipe("cpt", ["--config", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("xlt: error: float8: true needs"), err


def test_check_refuses_bad_checkpointing_and_compile_without_a_compiler(tmp_path, capsys, monkeypatch):
    rc, r = _check(capsys, "--config", _recipe(tmp_path, "smollm2-135m-ja/cpt", activation_checkpointing_every=-1),
                   "--offline", "--gpus", "0")
    assert [p for p in r["problems"] if p.startswith("activation_checkpointing_every=-1")], r["problems"]
    rc, r = _check(capsys, "--config", _recipe(tmp_path / "k", "smollm2-135m-ja/cpt", activation_checkpointing_every=4),
                   "--offline", "--gpus", "0")
    assert rc == 0 and r["activation_checkpointing"] == "every 4", r["problems"]
    monkeypatch.setattr("shutil.which", lambda name: None)
    rc, r = _check(capsys, "--config", _recipe(tmp_path / "c", "smollm2-135m-ja/cpt", compile_blocks=True),
                   "--offline", "--gpus", "0")
    assert [p for p in r["problems"] if p.startswith("compile_blocks: true on the CPU needs a C++ compiler")]


# ---------------------------------------------------------------------------------------------
# HSDP
# ---------------------------------------------------------------------------------------------
def test_multi_node_config_is_hsdp_and_accelerate_launches_it_so(monkeypatch):
    from accelerate import ParallelismConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # accelerate reads it as an int
    args = launch_command_parser().parse_args(["--config_file", MULTI_NODE, "--machine_rank", "0",
                                               "--main_process_ip", "10.0.0.1", "x.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    assert env["ACCELERATE_USE_PARALLELISM_CONFIG"] == "true"
    for k, v in env.items():
        if k.startswith("PARALLELISM_CONFIG_"):
            monkeypatch.setenv(k, v)
    pc = ParallelismConfig()
    assert (pc.dp_replicate_size, pc.dp_shard_size, pc.total_size) == (4, 8, 32) and pc.dp_replicate_enabled


def _multi_node(tmp_path: Path, replicate: int, shard: int) -> str:
    cfg = yaml.safe_load(Path(MULTI_NODE).read_text(encoding="utf-8"))
    cfg["parallelism_config"] = {"parallelism_config_dp_replicate_size": replicate,
                                 "parallelism_config_dp_shard_size": shard}
    path = tmp_path / f"hsdp-{replicate}x{shard}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return str(path)


def test_check_computes_the_hsdp_mesh_and_refuses_a_mismatch(tmp_path, capsys):
    recipe = str(REPO / "recipes/llama2-7b-ja/cpt.yaml")
    rc, r = _check(capsys, "--config", recipe, "--accelerate_config", MULTI_NODE, *H100)
    assert rc == 0 and r["mesh"] == "dp_replicate 4 x dp_shard 8" and r["world_size"] == 32, r["problems"]
    rc, r = _check(capsys, "--config", recipe, "--accelerate_config", _multi_node(tmp_path, 2, 8), *H100)
    assert [p for p in r["problems"] if "dp_replicate_size 2 x dp_shard_size 8 = 16 does not match num_processes 32"
            in p and "dp_replicate_size 4 = num_machines, dp_shard_size 8" in p], r["problems"]
    rc, r = _check(capsys, "--config", recipe, "--accelerate_config", _multi_node(tmp_path, 2, 16), *H100)
    assert [p for p in r["problems"] if "dp_shard_size 16 is not the 8 processes of one machine" in p], r["problems"]


def test_launch_slurm_renders_an_accelerate_command_for_every_node(tmp_path, monkeypatch):
    """recipes/launch.slurm: valid bash; run under a stand-in Slurm (4 nodes), srun gets one accelerate launch per
    node that accelerate's own parser accepts: the HSDP config, 4 machines x 8 GPUs = 32 processes, the first node
    as the rendezvous, this node's rank, the recipe given to sbatch."""
    import shlex
    import subprocess

    from accelerate.commands.launch import launch_command_parser

    script = REPO / "recipes" / "launch.slurm"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\ngpu-c\\ngpu-d\\n'\n")
    (bin_dir / "srun").write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" > {tmp_path / 'srun-args'}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-[a-d]",
               SLURM_NNODES="4")
    proc = subprocess.run(["bash", str(script), "recipes/mistral-7b-ja/cpt.yaml"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "srun-args").read_text().split("\0")[:-1]
    assert argv[:2] == ["bash", "-c"] and len(argv) == 3
    inner = argv[2]
    assert subprocess.run(["bash", "-n", "-c", inner]).returncode == 0
    words = shlex.split(inner.replace("$SLURM_NODEID", "2"))  # what each node's shell expands
    assert words[:2] == ["accelerate", "launch"]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    args = launch_command_parser().parse_args(words[2:])
    assert args.config_file == "accelerate_configs/multi_node_fsdp2.yaml" and (REPO / args.config_file).is_file()
    assert (args.num_machines, args.num_processes, args.machine_rank) == (4, 32, 2)
    assert args.main_process_ip == "gpu-a" and args.training_script == "recipes/cpt.py"
    assert args.training_script_args == ["--config", "recipes/mistral-7b-ja/cpt.yaml"]
