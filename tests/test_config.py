"""Recipe parsing: YAML + command-line overrides, unknown keys, and every shipped recipe."""

from __future__ import annotations

import glob
import os

import pytest
import yaml
from transformers import TrainingArguments
from trl import SFTConfig

from conftest import REPO
from xlt.config import (
    CptArguments,
    DataArguments,
    EvalArguments,
    ModelArguments,
    OutputArguments,
    SftArguments,
    TokenizerArguments,
    XltError,
    parse_recipe,
    validate_data_args,
)

CPT_TYPES = [ModelArguments, TokenizerArguments, DataArguments, CptArguments, TrainingArguments]


def write(tmp_path, data: dict, name: str = "r.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return str(path)


def test_yaml_values_and_command_line_override(tmp_path):
    path = write(tmp_path, {"model": "org/some-model", "seq_len": 512, "learning_rate": 3e-4, "output_dir": "o",
                            "sources": [{"name": "a", "lang": "ja", "embedded": "hironsan"}]})
    model, tok, data, cpt, train = parse_recipe(CPT_TYPES, ["--config", path, "--learning_rate", "1e-4"])
    assert model.model == "org/some-model"
    assert data.seq_len == 512
    assert data.sources == [{"name": "a", "lang": "ja", "embedded": "hironsan"}]
    assert train.learning_rate == pytest.approx(1e-4)  # the command line wins over the YAML
    assert tok.tokenizer_mode == "none" and cpt.spike_factor == 0.0  # untouched defaults


def test_unknown_recipe_key_is_named(tmp_path):
    path = write(tmp_path, {"model": "org/m", "learnig_rate": 1e-4, "output_dir": "o"})
    with pytest.raises(XltError, match="learnig_rate"):
        parse_recipe(CPT_TYPES, ["--config", path])


def test_unknown_command_line_option_is_named(tmp_path):
    path = write(tmp_path, {"model": "org/m", "output_dir": "o"})
    with pytest.raises(XltError, match="--no_such_option"):
        parse_recipe(CPT_TYPES, ["--config", path, "--no_such_option", "1"])


def test_missing_recipe_file_and_bad_yaml(tmp_path):
    with pytest.raises(XltError, match="recipe file not found"):
        parse_recipe(CPT_TYPES, ["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n", encoding="utf-8")
    with pytest.raises(XltError, match="invalid YAML"):
        parse_recipe(CPT_TYPES, ["--config", str(bad)])


@pytest.mark.parametrize("field,value,match", [
    ("ja_ratio_end", 1.5, "ja_ratio_end"), ("ja_ratio_start", -0.1, "ja_ratio_start"),
    ("ja_schedule", "exponential", "ja_schedule"), ("seq_len", 100, "seq_len"), ("slw_min_len", 12, "slw_min_len"),
])
def test_data_validation_names_the_key(field, value, match):
    args = DataArguments(sources=[{"name": "a", "lang": "ja", "embedded": "hironsan"}], seq_len=256)
    setattr(args, field, value)
    with pytest.raises(XltError, match=match):
        validate_data_args(args)


RECIPE_DIRS = sorted(d for d in glob.glob(str(REPO / "recipes" / "*")) if os.path.isdir(d))


@pytest.mark.parametrize("recipe_dir", RECIPE_DIRS, ids=os.path.basename)
def test_every_shipped_recipe_parses_and_is_consistent(recipe_dir):
    files = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(recipe_dir, "*.yaml"))}
    assert {"tokenizer", "cpt", "sft", "evaluate"} <= files
    # bf16 recipes are for GPUs; this machine has none, so the test parses them with bf16 off.
    model, tok, data, cpt, train = parse_recipe(CPT_TYPES, ["--config", os.path.join(recipe_dir, "cpt.yaml"),
                                                            "--bf16", "false"])
    validate_data_args(data)
    assert train.max_grad_norm == 1.0
    (sft, sft_train) = parse_recipe([SftArguments, SFTConfig], ["--config", os.path.join(recipe_dir, "sft.yaml"),
                                                               "--bf16", "false"])
    assert sft.sft_datasets
    (ev,) = parse_recipe([EvalArguments], ["--config", os.path.join(recipe_dir, "evaluate.yaml")])
    assert ev.model == model.model and ev.output_dir == train.output_dir == sft_train.output_dir
    # The tokenizer stage on its own uses exactly the settings continued pretraining uses (its cache key).
    m2, tok2, data2, _, out = parse_recipe([ModelArguments, TokenizerArguments, DataArguments, CptArguments,
                                            OutputArguments], ["--config", os.path.join(recipe_dir, "tokenizer.yaml")])
    assert (m2.model, tok2, data2.sources, out.output_dir) == (model.model, tok, data.sources, train.output_dir)


def test_real_recipes_match_their_specification():
    (_, tok, data, cpt, train) = parse_recipe(CPT_TYPES, ["--config", str(REPO / "recipes/llama2-7b-ja/cpt.yaml"),
                                                          "--bf16", "false"])
    assert yaml.safe_load((REPO / "recipes/llama2-7b-ja/cpt.yaml").read_text())["bf16"] is True
    assert tok.tokenizer_mode == "extend" and 42_000 <= 32_000 + tok.new_tokens <= 44_000
    assert data.ja_ratio_end == 0.9 and data.seq_len == 4096 and cpt.train_tokens == 100_000_000_000
    assert train.learning_rate == 1e-4 and train.lr_scheduler_type == "cosine"
    datasets_ = {s["dataset"] + ":" + s.get("config", "") for s in data.sources}
    assert datasets_ == {"wikimedia/wikipedia:20231101.ja", "HuggingFaceFW/fineweb-2:jpn_Jpan",
                         "HuggingFaceFW/fineweb-edu:sample-100BT"}
    (sft, sft_train) = parse_recipe([SftArguments, SFTConfig], ["--config", str(REPO / "recipes/llama2-7b-ja/sft.yaml"),
                                                               "--bf16", "false"])
    assert {d["dataset"] for d in sft.sft_datasets} == {"fujiki/japanese_alpaca_data",
                                                        "kunishou/databricks-dolly-15k-ja", "kunishou/hh-rlhf-49k-ja"}
    assert sft_train.num_train_epochs == 3
    fsdp = yaml.safe_load((REPO / "accelerate_configs/fsdp2.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
