"""LoRA with trainable new-vocabulary rows: what trains, the pure merge, the saved model, Trainer use."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from conftest import tiny_llama
from xlt.config import XltError
from xlt.train.lora import (
    NEW_ROW_MODES,
    LoraSettings,
    apply_lora,
    check_lora_targets,
    merged_state_dict,
    save_merged,
)

OLD = 40  # base vocabulary rows
NEW = list(range(OLD, 48))  # the appended (new-token) rows
V = OLD + len(NEW)
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _settings(mode: str, **kw) -> LoraSettings:
    return LoraSettings(use_lora=True, lora_r=4, lora_alpha=8, lora_new_rows=mode, **kw)


def _peft(tie: bool, mode: str, seed: int = 0):
    model = tiny_llama(V, tie=tie, seed=seed)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return apply_lora(model, _settings(mode), NEW), base


def _batch(seed: int) -> torch.Tensor:
    """Two rows of 24 ids containing every id (old and new) at least once, shuffled."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.arange(V), torch.randint(0, V, (2 * 24 - V,), generator=g)])
    return ids[torch.randperm(ids.numel(), generator=g)].view(2, 24)


def _train(pm, steps: int = 3) -> None:
    """A few real AdamW steps on the trainable parameters."""
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    pm.train()
    for step in range(steps):
        x = _batch(step)
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()


def _merged(pm) -> dict:
    return merged_state_dict(pm.state_dict(), pm.peft_config["default"])


@pytest.mark.parametrize("tie", [True, False])
def test_trainable_tokens_only_lora_and_new_rows_change(tie):
    pm, base = _peft(tie, "trainable_tokens")
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    _train(pm)
    merged = _merged(pm)
    assert set(merged) == set(base)
    lora_targets = {n.split(".base_layer")[0].removeprefix("base_model.model.") + ".weight"
                    for n, _ in pm.named_parameters() if ".base_layer.weight" in n and "token_adapter" not in n}
    assert len(lora_targets) == 2 * 7  # q k v o gate up down, two layers
    for key, before in base.items():
        after = merged[key]
        if key in (EMBED, HEAD):
            assert torch.equal(after[:OLD], before[:OLD]), f"{key}: an old row changed"
            changed = (after[OLD:] != before[OLD:]).any(dim=1)
            assert changed.all(), f"{key}: new rows not trained: {(~changed).nonzero().flatten().tolist()}"
        elif key in lora_targets:
            assert not torch.equal(after, before), f"{key}: LoRA delta not merged"
        else:
            assert torch.equal(after, before), f"{key}: a frozen weight changed"
    if tie:
        assert torch.equal(merged[EMBED], merged[HEAD])


@pytest.mark.parametrize("tie", [True, False])
def test_modules_to_save_trains_whole_matrices_and_freezes_the_rest(tie):
    pm, base = _peft(tie, "modules_to_save")
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert all("lora_" in n or ".modules_to_save." in n for n in trainable)
    assert sum(".modules_to_save." in n for n in trainable) == (1 if tie else 2)  # tied: one shared copy
    _train(pm)
    merged = _merged(pm)
    for key in (EMBED, HEAD):
        assert not torch.equal(merged[key][:OLD], base[key][:OLD])  # the whole matrix trains, old rows too
        assert (merged[key][OLD:] != base[key][OLD:]).any(dim=1).all()
    if tie:
        assert torch.equal(merged[EMBED], merged[HEAD])
    for key in ("model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(merged[key], base[key])


@pytest.mark.parametrize("mode", NEW_ROW_MODES)
@pytest.mark.parametrize("tie", [True, False])
def test_merged_state_dict_equals_merge_and_unload(tie, mode):
    pm, _ = _peft(tie, mode)
    _train(pm)
    sd = pm.state_dict()
    snapshot = {k: v.clone() for k, v in sd.items()}
    # what the trainer passes on rank 0: gathered copies, no shared storage with the live model
    merged = merged_state_dict(snapshot, pm.peft_config["default"].to_dict())
    reference = copy.deepcopy(pm).merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    for key, ref in reference.items():
        assert merged[key].dtype == ref.dtype and merged[key].shape == ref.shape, key
        torch.testing.assert_close(merged[key], ref, rtol=1e-6, atol=1e-6, msg=key)
    assert all(torch.equal(snapshot[k], sd[k]) for k in sd)  # pure: the input is not modified
    assert not torch.equal(merged[EMBED][OLD:], snapshot["base_model.model." + (
        "model.embed_tokens.token_adapter.base_layer.weight" if mode == "trainable_tokens"
        else "model.embed_tokens.original_module.weight")][OLD:])


@pytest.mark.parametrize("mode", NEW_ROW_MODES)
@pytest.mark.parametrize("tie", [True, False])
def test_saved_folder_reloads_with_same_logits(tmp_path, embedded_tokenizer, tie, mode):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pm, _ = _peft(tie, mode)
    _train(pm)
    out = tmp_path / "merged"
    save_merged(pm.get_base_model().config, _merged(pm), embedded_tokenizer, str(out))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert (HEAD in set(f.keys())) is not tie  # tied: the head is stored once, as the embedding
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert (reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()) is tie
    x = _batch(7)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, pm(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    assert len(AutoTokenizer.from_pretrained(str(out))) == len(embedded_tokenizer)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == V


def test_bad_target_module_is_one_line_listing_what_exists():
    from transformers import LlamaConfig

    model = tiny_llama(V)
    for source in (model, model.config, LlamaConfig(**model.config.to_dict())):
        with pytest.raises(XltError, match=r"lora_target_modules: no linear layer named nope") as e:
            check_lora_targets(source, _settings("trainable_tokens", lora_target_modules=["q_proj", "nope"]))
        msg = str(e.value)
        assert "\n" not in msg and "q_proj" in msg.split("linear layers:")[1] and "down_proj" in msg
    for not_linear in ("embed_tokens", "lm_head", "input_layernorm"):
        with pytest.raises(XltError, match=not_linear):
            check_lora_targets(model, _settings("trainable_tokens", lora_target_modules=[not_linear]))
    with pytest.raises(XltError, match="lora_target_modules"):
        apply_lora(model, _settings("trainable_tokens", lora_target_modules="q_proj,v_pro"), NEW)
    assert not hasattr(model, "peft_config")  # refused before wrapping
    names = check_lora_targets(model.config, _settings("trainable_tokens", lora_target_modules="q_proj, v_proj"))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def test_new_token_ids_outside_the_embedding_are_refused():
    with pytest.raises(XltError, match=r"new token ids must lie in \[0, 48\)"):
        apply_lora(tiny_llama(V), _settings("trainable_tokens"), [OLD, V])


@pytest.mark.parametrize("kwargs, key", [
    ({"use_lora": "yes"}, "use_lora"),
    ({"lora_r": 0}, "lora_r"),
    ({"lora_r": 8.0}, "lora_r"),
    ({"lora_r": True}, "lora_r"),
    ({"lora_alpha": 0}, "lora_alpha"),
    ({"lora_alpha": float("nan")}, "lora_alpha"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"lora_dropout": -0.1}, "lora_dropout"),
    ({"lora_target_modules": []}, "lora_target_modules"),
    ({"lora_target_modules": ["q_proj", ""]}, "lora_target_modules"),
    ({"lora_target_modules": ["all-linear", "q_proj"]}, "lora_target_modules"),
    ({"lora_target_modules": 3}, "lora_target_modules"),
    ({"lora_new_rows": "full"}, "lora_new_rows"),
])
def test_settings_validation(kwargs, key):
    with pytest.raises(XltError) as e:
        LoraSettings(**kwargs)
    assert str(e.value).startswith(f"{key}:") and "\n" not in str(e.value)


def test_settings_defaults_and_normalisation():
    s = LoraSettings()
    assert (s.use_lora, s.lora_r, s.lora_alpha, s.lora_dropout, s.lora_target_modules, s.lora_new_rows) == (
        False, 64, 128, 0.0, "all-linear", "trainable_tokens")
    assert LoraSettings(lora_target_modules="q_proj, v_proj,q_proj").lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_trainer_runs_two_steps(tmp_path, tie):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    pm, base = _peft(tie, "trainable_tokens")
    rows = [_batch(i)[0].tolist() for i in range(8)]
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
                             use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=pm, args=args, train_dataset=data)
    result = trainer.train()
    assert trainer.state.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    merged = _merged(pm)
    for key in (EMBED, HEAD):
        assert torch.equal(merged[key][:OLD], base[key][:OLD])
        assert not torch.equal(merged[key][OLD:], base[key][OLD:])
