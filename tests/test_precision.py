"""Precision a recipe leaves unset follows the device (issue 15, item 8).

A recipe without ``bf16`` / ``fp16`` gets bf16 on a CUDA GPU that computes in it and fp32 elsewhere, logged and
in report.json (``precision`` / ``precision_source``); a recipe that sets them keeps them. Tokenizer-only commands
(``xlt sft preview``, ``xlt data preview``, ``xlt check``) never build device-checked training arguments. This
machine has no GPU: the runs below are the CPU side, the CUDA side is decided on a stand-in device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from conftest import REPO
from xlt.cli import main, run_recipe

DEMO = REPO / "recipes/smollm2-135m-ja"
NO_DEVICE_KEYS = ("bf16", "fp16", "use_cpu")


def _write(tmp_path: Path, name: str, data: dict) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return str(path)


def _demo(stage: str, **changes) -> dict:
    data = yaml.safe_load((DEMO / f"{stage}.yaml").read_text(encoding="utf-8"))
    for key in NO_DEVICE_KEYS:
        data.pop(key, None)
    data.update(changes)
    return data


def _sft_recipe(tmp_path: Path, **changes) -> str:
    return _write(tmp_path, "sft.yaml", _demo("sft", output_dir=str(tmp_path / "run"), max_length=256,
                                              sft_datasets=[{"adapter": "chatterbot", "embedded": "chatterbot-ja",
                                                             "max_examples": 8}], **changes))


# ---------------------------------------------------------------------------------------------
# The decision
# ---------------------------------------------------------------------------------------------
def test_unset_precision_follows_the_device_and_a_set_one_is_kept():
    from xlt.train.runtime import resolve_precision

    h100 = lambda: (True, "cuda (NVIDIA H100)")  # noqa: E731
    v100 = lambda: (False, "cuda (Tesla V100)")  # noqa: E731
    cpu = lambda: (False, "cpu")  # noqa: E731
    unset = {"bf16": None, "fp16": None}
    assert resolve_precision(unset, None, env={}, device=h100) == {"precision": "bf16", "source": "auto: cuda (NVIDIA H100)"}
    assert resolve_precision(unset, None, env={}, device=v100) == {"precision": "fp32", "source": "auto: cuda (Tesla V100)"}
    assert resolve_precision(unset, None, env={}, device=cpu) == {"precision": "fp32", "source": "auto: cpu"}
    # use_cpu in the recipe, or an accelerate launch with use_cpu: the CPU, whatever GPU is there.
    assert resolve_precision(unset, True, env={}, device=h100)["precision"] == "fp32"
    assert resolve_precision(unset, None, env={"ACCELERATE_USE_CPU": "true"}, device=h100)["precision"] == "fp32"
    # Set by the recipe: kept, on any device (bf16 on a CPU with use_cpu is CPU autocast).
    assert resolve_precision({"bf16": True}, True, env={}, device=cpu) == {"precision": "bf16", "source": "recipe"}
    assert resolve_precision({"bf16": "false"}, None, env={}, device=h100) == {"precision": "fp32", "source": "recipe"}
    assert resolve_precision({"fp16": True}, None, env={}, device=v100) == {"precision": "fp16", "source": "recipe"}


def test_parse_tells_unset_from_set(tmp_path):
    from transformers import TrainingArguments
    from trl import SFTConfig

    from xlt.config import SftArguments, parse_recipe

    path = _sft_recipe(tmp_path)
    _, args = parse_recipe([SftArguments, SFTConfig], ["--config", path])
    assert args.bf16 is False and args.xlt_precision == {"precision": "fp32", "source": "auto: cpu"}
    # The command line and the recipe both count as set; bf16 on the CPU keeps CPU autocast (use_cpu).
    _, args = parse_recipe([SftArguments, SFTConfig], ["--config", path, "--bf16", "true", "--use_cpu", "true"])
    assert args.bf16 is True and args.xlt_precision == {"precision": "bf16", "source": "recipe"}
    set_path = _write(tmp_path / "set", "sft.yaml", {**yaml.safe_load(Path(path).read_text()), "bf16": False})
    _, args = parse_recipe([SftArguments, SFTConfig], ["--config", set_path])
    assert args.bf16 is False and args.xlt_precision["source"] == "recipe"
    (args,) = parse_recipe([TrainingArguments], ["--output_dir", str(tmp_path / "o")])
    assert args.bf16 is False and args.xlt_precision["source"] == "auto: cpu"


# ---------------------------------------------------------------------------------------------
# Tokenizer-only commands
# ---------------------------------------------------------------------------------------------
def test_sft_preview_of_a_recipe_without_bf16_runs_on_a_cpu(tmp_path, capsys):
    path = _sft_recipe(tmp_path, model="smollm2-135m")
    assert main(["sft", "preview", "--config", path, "--n", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and all(r["trained"] for r in rows)


def test_sft_preview_of_a_gpu_recipe_runs_on_a_cpu(tmp_path, capsys):
    """bf16: true without use_cpu (a GPU recipe) previewed on a laptop: the tokenizer needs no device."""
    path = _sft_recipe(tmp_path, model="smollm2-135m", bf16=True)
    assert main(["sft", "preview", "--config", path, "--n", "1", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1


def test_data_preview_of_a_gpu_recipe_runs_on_a_cpu(tmp_path, capsys):
    data = _demo("cpt", bf16=True, output_dir=str(tmp_path / "run"), train_tokens=4096)
    path = _write(tmp_path, "cpt.yaml", data)
    assert main(["data", "preview", "--config", path, "--steps", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_check_gives_an_sft_recipe_without_bf16_the_precision_of_the_target(tmp_path):
    from xlt.check import run_check

    path = _sft_recipe(tmp_path, model="smollm2-135m")
    cpu = run_check(path, offline=True, gpus=0)
    assert cpu["ok"], cpu["problems"]
    assert cpu["precision"] == "fp32 (auto: cpu)"
    gpus = run_check(path, offline=True, gpus=8, gpu_memory_gb=80)
    assert gpus["precision"] == "bf16 (auto: 8 GPU(s) given)"
    set_bf16 = run_check(_sft_recipe(tmp_path / "b", model="smollm2-135m", bf16=True), offline=True, gpus=8)
    assert set_bf16["precision"] == "bf16"


# ---------------------------------------------------------------------------------------------
# Runs on a CPU without bf16 in the recipe
# ---------------------------------------------------------------------------------------------
def _report(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "report.json"), encoding="utf-8") as f:
        return json.load(f)


def test_cpt_and_sft_without_bf16_on_a_cpu_train_in_fp32_chosen_automatically(tmp_path, tiny_model_dir):
    out = str(tmp_path / "run")
    cpt = _write(tmp_path, "cpt.yaml", _demo("cpt", model=tiny_model_dir, output_dir=out, new_tokens=64,
                                             train_tokens=2048, save_steps=100, logging_steps=1, eval_max_docs=4))
    assert run_recipe("cpt", ["--config", cpt]) == 0
    sft = _write(tmp_path, "sft.yaml", _demo("sft", output_dir=out, max_length=256, eval_fraction=0.0,
                                             sft_datasets=[{"adapter": "chatterbot", "embedded": "chatterbot-ja",
                                                            "max_examples": 4}]))
    assert run_recipe("sft", ["--config", sft, "--max_steps", "1", "--per_device_train_batch_size", "2"]) == 0
    report = _report(out)
    for stage in ("cpt", "sft"):
        assert report[stage]["precision"] == "fp32", stage
        assert report[stage]["precision_source"] == "auto: cpu", stage


def test_a_recipe_that_asks_bf16_on_a_cpu_keeps_cpu_autocast(tmp_path, tiny_model_dir):
    out = str(tmp_path / "run")
    (tmp_path / "run").mkdir()
    sft = _write(tmp_path, "sft.yaml", _demo("sft", model=tiny_model_dir, output_dir=out, max_length=256,
                                             eval_fraction=0.0, bf16=True, use_cpu=True,
                                             sft_datasets=[{"adapter": "chatterbot", "embedded": "chatterbot-ja",
                                                            "max_examples": 4}]))
    assert run_recipe("sft", ["--config", sft, "--max_steps", "1", "--per_device_train_batch_size", "2"]) == 0
    assert _report(out)["sft"]["precision"] == "bf16" and _report(out)["sft"]["precision_source"] == "recipe"
