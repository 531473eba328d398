"""``xlt check``: the preflight passes the shipped GPU recipes and catches each class of problem, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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
    assert r["memory_per_gpu_gb"] < 80  # the README's values, component by component: test_readme_memory_table
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


@pytest.mark.parametrize("missing", ["fugashi", "unidic_lite"])
def test_mecab_without_fugashi(capsys, monkeypatch, missing):
    """fugashi, and the dictionary unidic-lite: either missing is reported (fugashi imports without it)."""
    monkeypatch.setitem(sys.modules, missing, None)  # import -> ImportError
    rc, r = run(capsys, "--config", "recipes/llama2-7b-ja/cpt.yaml", "--accelerate_config", FSDP2, *H100)
    assert rc == 1 and [p for p in r["problems"] if p.startswith("mecab: needs") and "unidic-lite" in p], r["problems"]


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


# ---------------------------------------------------------------------------------------------------------
# Memory per component: the README's table is the estimator's, and the estimate follows what a run allocates
# ---------------------------------------------------------------------------------------------------------
COMPONENTS = ("weights", "gradients", "optimizer", "gathered_weights", "unsharded_gradients", "reduce_buffers",
              "activations", "logits", "cuda_overhead", "total")
README_MEMORY = {  # GiB per GPU, fsdp2.yaml on 8 x 80 GiB, CPT with loss_implementation auto = chunked (no liger)
    "llama2-7b-ja/cpt": (3.18, 3.18, 6.36, 1.41, 1.41, 1.51, 6.12, 1.08, 3.0, 27.25),
    "llama2-7b-ja/sft": (3.18, 3.18, 6.36, 1.41, 1.41, 1.51, 3.06, 3.94, 3.0, 27.05),
    "mistral-7b-ja/cpt": (3.41, 3.41, 6.83, 1.47, 1.47, 1.63, 6.12, 1.08, 3.0, 28.41),
    "mistral-7b-ja/sft": (3.41, 3.41, 6.83, 1.47, 1.47, 1.63, 3.06, 3.92, 3.0, 28.19),
    "llama3-8b-ja/cpt": (3.74, 3.74, 7.48, 2.77, 2.77, 3.91, 6.12, 1.73, 3.0, 35.26),
    "llama3-8b-ja/sft": (3.74, 3.74, 7.48, 2.77, 2.77, 3.91, 3.06, 11.74, 3.0, 42.22),
}


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_readme_memory_table(capsys, monkeypatch, name):
    real = check.importable
    monkeypatch.setattr(check, "importable", lambda pkg: pkg != "liger_kernel" and real(pkg))
    rc, r = run(capsys, "--config", f"recipes/{name}.yaml", "--accelerate_config", FSDP2, *H100)
    assert rc == 0 and r["memory_breakdown_gb"] == dict(zip(COMPONENTS, README_MEMORY[name]))
    if name.endswith("cpt"):
        assert r["loss_implementation"] == "chunked"
        assert r["memory_savings"][0].startswith("logits: ") and "with loss_implementation chunked" in \
            r["memory_savings"][0]


def test_the_loss_key_moves_the_logits_component(capsys):
    """llama3-8b-ja: the model's own loss holds 2 x 8192 x 128,256 x 12 bytes (the fp32 log-softmax and its two
    gradients) = 23.48 GiB; the chunked loss one chunk."""
    argv = ["--config", "recipes/llama3-8b-ja/cpt.yaml", "--accelerate_config", FSDP2, *H100]
    rc, model = run(capsys, *argv, "--loss_implementation", "model")
    assert rc == 0 and model["memory_breakdown_gb"]["logits"] == round(2 * 8192 * 128256 * 12 / 2**30, 2) == 23.48
    assert model["memory_savings"][0] == "logits: 23.48 GiB -> 1.73 GiB with loss_implementation chunked"
    rc, chunked = run(capsys, *argv, "--loss_implementation", "chunked")
    assert chunked["memory_breakdown_gb"]["logits"] == 1.73
    assert model["memory_per_gpu_gb"] - chunked["memory_per_gpu_gb"] == pytest.approx(23.48 - 1.73, abs=0.02)
    rc, r = run(capsys, *argv, "--loss_implementation", "liger")  # liger-kernel is not installed here
    assert rc == 1 and [p for p in r["problems"] if p.startswith("loss_implementation=liger: needs liger-kernel")]


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, at its peak, while the mode is on: every storage an op creates is tracked
    until nothing else holds it (autograd's saved tensors included), a CPU stand-in for CUDA's peak memory."""

    def __init__(self, existing=()):
        super().__init__()
        self.storages, self.live, self.peak = {}, 0, 0
        self.existing = {t.untyped_storage()._cdata for t in existing}  # views of these allocate nothing

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st._cdata not in self.existing:
                    self.storages.setdefault(st._cdata, (st, st.nbytes()))
        self.sweep()
        return out

    def sweep(self) -> int:
        for key in [k for k in self.storages if torch._C._storage_Use_Count(k) <= 1]:  # only ours is left
            del self.storages[key]
        self.live = sum(n for _, n in self.storages.values())
        self.peak = max(self.peak, self.live)
        return self.live


@pytest.mark.parametrize("impl", ["model", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_component_matches_a_measurement(impl, dtype):
    """The peak of the loss (forward + backward from the last hidden states) within 15% of the estimate."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from xlt.train.losses import chunked_causal_lm_loss, loss_buffer_bytes

    V, H, B, S, chunk = 4000, 32, 2, 256, 64 * 4000
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False).to(dtype)
    hidden = torch.randn(B, S, H, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (B, S))
    with LiveBytes(existing=[head.weight, hidden]) as meter:
        if impl == "model":
            ForCausalLMLoss(head(hidden), labels, V).backward()
        else:
            chunked_causal_lm_loss(hidden, head, labels, V, chunk_elements=chunk)[0].backward()
    estimate = loss_buffer_bytes(impl, B * S, V, H, dtype.itemsize, chunk_elements=chunk)
    assert meter.peak == pytest.approx(estimate, rel=0.15), (meter.peak, estimate)


def test_gradients_component_matches_a_measurement():
    """One process, fp32, an untied tiny Llama: what a forward + backward leaves allocated is exactly the
    gradients component (no other persistent buffer), and the loss's share of the step's peak is its logits
    component (the model's own loss: 12 bytes per logit; the difference also holds the head's gradient, 4%)."""
    from conftest import tiny_llama
    from xlt.train.runtime import Launcher

    V, B, S = 4000, 2, 256
    model = tiny_llama(V, tie=False, hidden=64)
    size = check.size_model(model.config, V)
    plan = check.LaunchPlan(Launcher(kind="single", world_size=1), "test")
    est = check.memory_bytes(size, plan, 1, 1, "float32", "float32", B, S, False, loss="model")
    ids = torch.randint(0, V, (B, S))
    with LiveBytes(existing=model.parameters()) as full:
        model(input_ids=ids, labels=ids).loss.backward()
    assert full.sweep() == pytest.approx(est["gradients"], rel=0.01)  # all that outlives the step: gradients
    model.zero_grad(set_to_none=True)
    probe = torch.randn(B, S, 64)
    keep = torch.empty(0, dtype=torch.long)
    with LiveBytes(existing=[*model.parameters(), probe, keep]) as body:  # the same step without the logits
        (model(input_ids=ids, logits_to_keep=keep, output_hidden_states=True).hidden_states[-1] * probe).sum().backward()
    assert full.peak - body.peak == pytest.approx(est["logits"], rel=0.15), (full.peak - body.peak, est["logits"])


def test_the_data_note_says_what_continued_pretraining_will_read(capsys, tmp_path):
    """Shards by default: missing ones are prepared first by xlt cpt, present ones are used; or the stream."""
    argv = ["--config", "recipes/smollm2-135m-ja/cpt.yaml", "--accelerate_config",
            str(REPO / "accelerate_configs" / "cpu.yaml"), "--gpus", "0", "--output_dir", str(tmp_path)]
    data = str(tmp_path / "data")
    notes = [n for n in run(capsys, *argv)[1]["notes"] if n.startswith("data: ")]
    assert notes == [f"data: no token shards in {data} yet: xlt cpt prepares them first, on one process; for a "
                     "large corpus run xlt data prepare --processes N beforehand"]
    os.makedirs(data)
    (tmp_path / "data" / "prepared.json").write_text("{}")
    assert [n for n in run(capsys, *argv)[1]["notes"] if n.startswith("data: ")] == [
        f"data: token shards in {data} (used when prepared with this run's settings, refused in one line otherwise)"]
    notes = [n for n in run(capsys, *argv, "--data_source", "stream")[1]["notes"] if n.startswith("data: ")]
    assert notes == ["data: the in-memory stream (data_source: stream): process 0 reads, cleans and tokenizes during "
                     "training"]
