"""The final model is saved in the base model's dtype (issue 15, item 7).

``save_dtype: auto`` (the default) casts the final tensors to the dtype the base model's config names (bf16 for
hub models), ``float32`` keeps the fp32 master weights; config.json's ``dtype`` always matches the tensors. The
LoRA merged save goes through the same cast. Evaluation loads a saved model in fp32 on a CPU whatever its dtype.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import REPO, tiny_llama
from xlt.cli import run_recipe

DEMO_CPT = REPO / "recipes/smollm2-135m-ja/cpt.yaml"


def _tensor_dtypes(model_dir: str) -> set[torch.dtype]:
    with safe_open(os.path.join(model_dir, "model.safetensors"), framework="pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def _config_dtype(model_dir: str) -> str:
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)["dtype"]


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory, embedded_tokenizer) -> str:
    """A tiny Llama saved as hub models are: bf16 tensors, config dtype bfloat16."""
    out = tmp_path_factory.mktemp("bf16-model")
    model = tiny_llama(len(embedded_tokenizer)).to(torch.bfloat16)
    model.config.eos_token_id = embedded_tokenizer.eos_token_id
    model.save_pretrained(out)
    embedded_tokenizer.save_pretrained(out)
    assert _config_dtype(str(out)) == "bfloat16" and _tensor_dtypes(str(out)) == {torch.bfloat16}
    return str(out)


def _cpt(tmp_path: Path, model: str, *extra: str) -> str:
    out = str(tmp_path / "run")
    data = yaml.safe_load(DEMO_CPT.read_text(encoding="utf-8"))
    data.update({"model": model, "output_dir": out, "tokenizer_mode": "none", "train_tokens": 2048,
                 "save_steps": 100, "logging_steps": 1, "eval_max_docs": 4})
    data.pop("torch_dtype")
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cpt.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    assert run_recipe("cpt", ["--config", str(path), *extra]) == 0
    return out


# ---------------------------------------------------------------------------------------------
# The decision and the cast
# ---------------------------------------------------------------------------------------------
def test_auto_is_the_base_config_dtype():
    from transformers import LlamaConfig

    from xlt.config import XltError
    from xlt.train.distributed import base_save_dtype, resolve_save_dtype

    assert resolve_save_dtype("auto", LlamaConfig(dtype="bfloat16")) == "bfloat16"
    assert resolve_save_dtype("auto", LlamaConfig(dtype="float16")) == "float16"
    assert resolve_save_dtype("auto", LlamaConfig()) == "float32"  # no dtype named: the weights as trained
    assert resolve_save_dtype("float32", LlamaConfig(dtype="bfloat16")) == "float32"
    with pytest.raises(XltError, match="save_dtype='fp8'"):
        resolve_save_dtype("fp8", None)
    # The embedded SmolLM2 is materialised from GGUF in fp32 and its config says so: auto keeps fp32.
    assert base_save_dtype("auto", "smollm2-135m") == "float32"


def test_cast_keeps_tied_tensors_shared_and_leaves_integers():
    from xlt.train.distributed import cast_state_dict

    emb = torch.randn(4, 3)
    sd = {"embed.weight": emb, "lm_head.weight": emb.detach(), "steps": torch.tensor([3])}
    out = cast_state_dict(sd, "bfloat16")
    assert out["embed.weight"].dtype == torch.bfloat16 and out["embed.weight"] is out["lm_head.weight"]
    assert out["steps"].dtype == torch.int64
    assert cast_state_dict({"w": emb}, None)["w"] is emb


def test_lora_merged_save_is_cast(tmp_path, embedded_tokenizer):
    from peft import LoraConfig, get_peft_model

    from xlt.train.distributed import save_final_model

    model = get_peft_model(tiny_llama(len(embedded_tokenizer)), LoraConfig(r=4, target_modules=["q_proj"]))
    save_final_model(model, embedded_tokenizer, str(tmp_path / "m"), dtype="bfloat16")
    assert _tensor_dtypes(str(tmp_path / "m")) == {torch.bfloat16}
    assert _config_dtype(str(tmp_path / "m")) == "bfloat16"


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
def test_cpt_from_a_bf16_model_saves_bf16(tmp_path, bf16_model_dir):
    from xlt.models import load_model

    out = _cpt(tmp_path, bf16_model_dir)
    final = os.path.join(out, "cpt")
    assert _tensor_dtypes(final) == {torch.bfloat16} and _config_dtype(final) == "bfloat16"
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        assert json.load(f)["cpt"]["save_dtype"] == "bfloat16"
    # Evaluation (bits per character) loads it with torch_dtype auto: fp32 on a CPU, as before.
    model = load_model(final)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_cpt_with_save_dtype_float32_keeps_fp32(tmp_path, bf16_model_dir):
    final = os.path.join(_cpt(tmp_path, bf16_model_dir, "--save_dtype", "float32"), "cpt")
    assert _tensor_dtypes(final) == {torch.float32} and _config_dtype(final) == "float32"


@pytest.mark.parametrize("lora", [False, True])
def test_a_crash_mid_save_leaves_the_previous_final_model_whole(tmp_path, embedded_tokenizer, monkeypatch, lora):
    """The final save is written into a temporary folder and swapped in: a crash after the weights were written
    (here: the tokenizer's save fails) leaves the previous final model byte for byte, and no temporary folder."""
    from peft import LoraConfig, get_peft_model

    from xlt.train.distributed import save_final_model

    def model(seed):
        m = tiny_llama(len(embedded_tokenizer), seed=seed)
        return get_peft_model(m, LoraConfig(r=4, target_modules=["q_proj"])) if lora else m

    final = tmp_path / "out" / "cpt"
    save_final_model(model(0), embedded_tokenizer, str(final))
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    assert "model.safetensors" in before

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(embedded_tokenizer), "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_final_model(model(1), embedded_tokenizer, str(final))
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
    assert sorted(p.name for p in final.parent.iterdir()) == ["cpt"]
