"""``xlt check``: the preflight passes the shipped GPU recipes and catches each class of problem, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from xlt import check

REPO = Path(__file__).resolve().parents[1]
FSDP2 = str(REPO / "accelerate_configs" / "fsdp2.yaml")
GPU_RECIPES = [f"{m}/{s}" for m in ("llama2-7b-ja", "mistral-7b-ja", "llama3-8b-ja") for s in ("cpt", "sft")]
H100 = ["--offline", "--gpus", "8", "--gpu-memory-gb", "80"]


def run(capsys, *argv: str) -> tuple[int, dict]:
    """``xlt check ... --json`` in process: (exit status, the one JSON object it printed)."""
    from xlt.cli import main

    rc = main(["check", *argv, "--json"])
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out  # one object on one line, nothing else on stdout
    return rc, json.loads(out)


def variant(tmp_path: Path, name: str, **changes) -> str:
    """A copy of a shipped recipe with some keys changed (None removes a key), writing into tmp_path."""
    data = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text(encoding="utf-8"))
    data["output_dir"] = str(tmp_path / "run")
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path = tmp_path / f"{name.replace('/', '-')}.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return str(path)


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # shipped recipes name relative output directories


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_shipped_gpu_recipes_pass_on_8x80gb_with_fsdp2(capsys, name):
    rc, r = run(capsys, "--config", f"recipes/{name}.yaml", "--accelerate_config", FSDP2, *H100)
    assert (rc, r["ok"], r["problems"]) == (0, True, [])
    for key in ("tokens_per_step", "max_steps", "master_weights_dtype", "attn_implementation", "launcher",
                "memory_per_gpu_gb", "memory_note", "memory_breakdown_gb", "skipped"):
        assert key in r
    assert r["launcher"] == "fsdp v2 x8" and r["world_size"] == 8
    assert r["master_weights_dtype"] == "float32"
    assert r["attn_implementation"] in ("sdpa", "flex_attention", "flash_attention_2")  # auto: what imports
    assert r["activation_checkpointing"] == "fsdp"  # the recipe key, handed to FSDP: no conflict
    assert 10 < r["memory_per_gpu_gb"] < 80
    b = r["memory_breakdown_gb"]
    assert b["optimizer"] == pytest.approx(2 * b["weights"], abs=0.02)  # fp32 master: AdamW 8P vs weights 4P
    assert any("not contacted (--offline)" in s for s in r["skipped"])
    if name.endswith("cpt"):
        data = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text(encoding="utf-8"))
        tps = data["seq_len"] * data["per_device_train_batch_size"] * data["gradient_accumulation_steps"] * 8
        assert r["tokens_per_step"] == tps
        assert r["max_steps"] == -(-data["train_tokens"] // tps)


def test_known_model_sizes_are_the_real_ones():
    """The table + meta-device count give the published parameter counts (no weights read)."""
    for spec, params in (("meta-llama/Llama-2-7b-hf", 6_738_415_616), ("mistralai/Mistral-7B-v0.1", 7_241_732_096),
                         ("meta-llama/Meta-Llama-3-8B", 8_030_261_248)):
        config, where = check.model_config(spec, offline=True)
        assert config is not None, where
        assert check.size_model(config, config.vocab_size).params == params


def test_flash_attention_without_flash_attn(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(check, "importable", lambda pkg: pkg != "flash_attn")
    rc, r = run(capsys, "--config", variant(tmp_path, "llama2-7b-ja/cpt", attn_implementation="flash_attention_2"),
                "--accelerate_config", FSDP2, *H100)
    assert rc == 1 and not r["ok"]
    assert [p for p in r["problems"] if "flash_attention_2" in p and "flash_attn" in p], r["problems"]


def test_pure_bf16_only_when_asked(tmp_path, capsys):
    rc, r = run(capsys, "--config", variant(tmp_path, "llama2-7b-ja/cpt", torch_dtype="bfloat16"),
                "--accelerate_config", FSDP2, *H100)
    assert rc == 1 and [p for p in r["problems"] if p.startswith("torch_dtype=bfloat16")], r["problems"]
    rc, r = run(capsys, "--config", variant(tmp_path, "llama2-7b-ja/cpt", torch_dtype="bfloat16",
                                            master_weights_dtype="bfloat16"), "--accelerate_config", FSDP2, *H100)
    assert (rc, r["master_weights_dtype"]) == (0, "bfloat16")
    assert r["memory_breakdown_gb"]["optimizer"] == pytest.approx(4 * r["memory_breakdown_gb"]["weights"], abs=0.02)


def test_report_to_tensorboard_without_tensorboard(capsys, monkeypatch):
    monkeypatch.setattr(check, "importable", lambda pkg: pkg not in ("tensorboard", "tensorboardX"))
    rc, r = run(capsys, "--config", "recipes/llama2-7b-ja/sft.yaml", "--accelerate_config", FSDP2, *H100)
    assert rc == 1 and r["problems"] == [
        "report_to: tensorboard needs the tensorboard package, which is not installed (pip install tensorboard), "
        "or set report_to: none"]


def test_num_processes_must_match_the_gpus(capsys):
    rc, r = run(capsys, "--config", "recipes/mistral-7b-ja/cpt.yaml", "--accelerate_config", FSDP2,
                "--offline", "--gpus", "4", "--gpu-memory-gb", "80")
    assert rc == 1 and len(r["problems"]) == 1 and "num_processes 8" in r["problems"][0], r["problems"]
    assert r["tokens_per_step"] == 4096 * 4 * 16 * 4  # planned for the hardware given


def test_deepspeed_refused_with_the_spike_guard(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(check, "importable", lambda pkg: pkg != "flash_attn")  # deepspeed "installed"
    ds = str(REPO / "accelerate_configs" / "deepspeed_zero3.yaml")
    rc, r = run(capsys, "--config", "recipes/llama2-7b-ja/cpt.yaml", "--accelerate_config", ds, *H100)
    assert rc == 1 and [p for p in r["problems"] if "spike guard is not supported under DeepSpeed" in p]
    off = variant(tmp_path, "llama2-7b-ja/cpt", skip_step_sigma=0, spike_factor=0, skip_nonfinite=False)
    rc, r = run(capsys, "--config", off, "--accelerate_config", ds, *H100)
    assert (rc, r["problems"], r["launcher"]) == (0, [], "deepspeed x8")
    monkeypatch.setattr(check, "importable", lambda pkg: pkg not in ("flash_attn", "deepspeed"))
    rc, r = run(capsys, "--config", off, "--accelerate_config", ds, *H100)
    assert rc == 1 and [p for p in r["problems"] if "deepspeed package" in p], r["problems"]


def test_memory_too_high(capsys):
    rc, r = run(capsys, "--config", "recipes/llama2-7b-ja/cpt.yaml", "--accelerate_config", FSDP2,
                "--offline", "--gpus", "8", "--gpu-memory-gb", "16")
    assert rc == 1 and len(r["problems"]) == 1 and r["problems"][0].startswith("memory: estimated")
    assert r["memory_per_gpu_gb"] > 16


def test_ddp_does_not_shard_a_7b_model(capsys):
    """DDP keeps full fp32 weights + grads + AdamW per GPU (16 bytes/param): a 7B model does not fit 80 GB."""
    ddp = str(REPO / "accelerate_configs" / "multi_gpu.yaml")
    rc, r = run(capsys, "--config", "recipes/llama2-7b-ja/cpt.yaml", "--accelerate_config", ddp, *H100)
    assert rc == 1 and r["problems"][0].startswith("memory: estimated")
    b = r["memory_breakdown_gb"]
    assert b["weights"] + b["gradients"] + b["optimizer"] > 16 * 6.7e9 / 2**30


def test_missing_local_data_file(tmp_path, capsys):
    sources = [{"name": "notes", "lang": "ja", "path": str(tmp_path / "missing.jsonl")},
               {"name": "en", "lang": "en", "embedded": "chatterbot-en"}]
    rc, r = run(capsys, "--config", variant(tmp_path, "llama3-8b-ja/cpt", sources=sources),
                "--accelerate_config", FSDP2, *H100)
    assert rc == 1 and r["problems"] == [f"sources[0]: data file not found: {tmp_path / 'missing.jsonl'}"]


def test_several_problems_reported_together(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(check, "importable", lambda pkg: pkg not in ("flash_attn", "tensorboard", "tensorboardX"))
    rc, r = run(capsys, "--config", variant(tmp_path, "llama2-7b-ja/cpt", torch_dtype="bfloat16"),
                "--accelerate_config", FSDP2, "--offline", "--gpus", "4", "--gpu-memory-gb", "16")
    assert rc == 1 and len(r["problems"]) == 4, r["problems"]


def test_mecab_without_fugashi(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fugashi", None)  # import fugashi -> ImportError
    rc, r = run(capsys, "--config", "recipes/llama2-7b-ja/cpt.yaml", "--accelerate_config", FSDP2, *H100)
    assert rc == 1 and [p for p in r["problems"] if p.startswith("mecab: needs")], r["problems"]


def test_lora_sizes_trainable_params_and_needs_peft(capsys, monkeypatch):
    argv = ["--config", "recipes/llama2-7b-ja/cpt.yaml", "--accelerate_config", FSDP2, *H100, "--use_lora", "true"]
    rc, r = run(capsys, *argv)
    assert rc == 0
    size = r["model_size"]
    # r=64 on the 7 linear layers of 32 blocks, plus the 11,008 new rows of the untied embedding and head
    adapters = 32 * 64 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert size["lora_trainable"] == adapters + 11008 * 4096 * 2
    assert r["memory_breakdown_gb"]["optimizer"] < 0.1 * r["memory_breakdown_gb"]["weights"] * 2
    monkeypatch.setattr(check, "importable", lambda pkg: pkg not in ("flash_attn", "peft"))
    rc, r = run(capsys, *argv)
    assert rc == 1 and [p for p in r["problems"] if "peft" in p], r["problems"]


def test_invalid_recipe_key_is_a_problem(tmp_path, capsys):
    rc, r = run(capsys, "--config", variant(tmp_path, "llama2-7b-ja/sft", learning_rte=1e-5),
                "--accelerate_config", FSDP2, *H100)
    assert rc == 1 and len(r["problems"]) == 1 and "learning_rte" in r["problems"][0]


def test_cpu_config_with_gpus_and_precision_mismatch(capsys):
    cpu = str(REPO / "accelerate_configs" / "cpu.yaml")
    rc, r = run(capsys, "--config", "recipes/llama2-7b-ja/cpt.yaml", "--accelerate_config", cpu, *H100)
    assert rc == 1
    assert [p for p in r["problems"] if "use_cpu: true" in p]
    assert [p for p in r["problems"] if "mixed_precision no" in p]


def test_demo_recipe_on_this_cpu_machine(capsys):
    rc, r = run(capsys, "--config", "recipes/smollm2-135m-ja/cpt.yaml", "--accelerate_config",
                str(REPO / "accelerate_configs" / "cpu.yaml"), "--gpus", "0")
    assert (rc, r["ok"], r["launcher"], r["tokens_per_step"], r["max_steps"]) == (0, True, "single x1 (cpu)", 1024, 64)


def test_bad_usage_exits_2(capsys):
    from xlt.cli import main

    assert main(["check", "--config", "no/such/recipe.yaml"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["check", "--config", "recipes/llama2-7b-ja/cpt.yaml", "--gpus", "-1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["check"])
    assert e.value.code == 2


def test_readable_table(capsys):
    from xlt.cli import main

    rc = main(["check", "--config", "recipes/llama3-8b-ja/cpt.yaml", "--accelerate_config", FSDP2, *H100])
    out = capsys.readouterr().out
    assert rc == 0 and out.rstrip().endswith("ok: true") and "memory/GPU" in out and "(estimate)" in out


def test_make_check_target(tmp_path):
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    phony = next(line for line in makefile.splitlines() if line.startswith(".PHONY:"))
    assert "check" in phony.split()
    venv = Path(sys.executable).parent.parent
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(["make", "--no-print-directory", "-s", "check", f"VENV={venv}",
                          "RECIPE=recipes/mistral-7b-ja/sft.yaml", "ACCELERATE_CONFIG=accelerate_configs/fsdp2.yaml",
                          "ARGS=--offline --gpus 8 --gpu-memory-gb 80 --json"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1])["ok"] is True


def test_new_row_keys_refused_as_the_cpt_stage_refuses_them(tmp_path, capsys):
    """llama3-8b-ja keeps its tokenizer: a new-row learning rate there has no rows to act on."""
    rc, r = run(capsys, "--config", variant(tmp_path, "llama3-8b-ja/cpt", new_rows_lr_multiplier=10.0),
                "--accelerate_config", FSDP2, "--offline", *H100)
    assert rc == 1 and len(r["problems"]) == 1 and r["problems"][0].startswith("new_rows_lr_multiplier=10.0: needs a "
                                                                              "tokenizer change")
