"""LoRA for continued pretraining, with the new (Japanese) vocabulary rows trainable.

Built on peft (``LoraConfig`` + ``get_peft_model``); the only things written here are the settings
check, the choice of peft options for the new rows, and a *pure* merge of a gathered state dict
(``merged_state_dict``), needed because under FSDP2 the live modules are sharded DTensors and peft's
``merge_and_unload`` cannot run on them: the trainer gathers the full state dict (accelerate's
``get_state_dict``) on rank 0 and merges that.

Two ways to train the new rows (``lora_new_rows``):

* ``trainable_tokens``: peft's ``trainable_token_indices``. Only the rows of ``new_token_ids`` train
  (a small ``(n_new, d)`` parameter per matrix); every other row is frozen and stays bit-identical.
* ``modules_to_save``: the whole input embedding and output head are trainable copies (simple, but
  full gradients and optimizer state for ``V x d`` twice, and the old rows drift too).
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

from xlt.config import ALL_LINEAR, NEW_ROW_MODES, LoraSettings, XltError  # noqa: F401 (LoraSettings: its home is config)
from xlt.models import meta_model

_PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------
def embedding_names(model: Any) -> tuple[str, Optional[str]]:
    """Full module names of the input embedding and the output head (None if the model has no head)."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    in_name = out_name = None
    for name, mod in model.named_modules():
        if mod is inp and in_name is None:
            in_name = name
        if out is not None and mod is out and out_name is None:
            out_name = name
    if in_name is None:
        raise XltError("lora: the model has no input embedding module")
    return in_name, out_name


def _linear_names(model: Any) -> list[str]:
    """Full names of the linear layers LoRA may adapt: every ``nn.Linear`` except the output head."""
    import torch

    _, head = embedding_names(model)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != head]


def check_lora_targets(model_or_config: Any, settings: LoraSettings) -> list[str]:
    """Check that the target modules exist and are linear layers; return the full names LoRA will adapt.

    Accepts a model, or a ``PretrainedConfig`` (then a meta-device model is built: no weights are
    loaded or allocated). A name matches a module whose full name is it or ends with ``.name`` (peft's
    rule). An unknown or non-linear name raises one line listing the linear layer names that exist.
    """
    model = model_or_config
    if not hasattr(model, "named_modules"):
        model = meta_model(model_or_config)
    linear = _linear_names(model)
    leaf = sorted({n.rsplit(".", 1)[-1] for n in linear})
    if not linear:
        raise XltError(f"lora_target_modules: {type(model).__name__} has no linear layers to adapt")
    if settings.lora_target_modules == ALL_LINEAR:
        return linear
    bad = [t for t in settings.lora_target_modules if not any(n == t or n.endswith("." + t) for n in linear)]
    if bad:
        raise XltError(f"lora_target_modules: no linear layer named {', '.join(bad)} in {type(model).__name__}; "
                       f"linear layers: {', '.join(leaf)} (or '{ALL_LINEAR}')")
    return [n for n in linear if any(n == t or n.endswith("." + t) for t in settings.lora_target_modules)]


# ---------------------------------------------------------------------------------------------
# Apply
# ---------------------------------------------------------------------------------------------
def _is_tied(model: Any) -> bool:
    """Input embedding and output head share one weight (and the config says so: peft reads the config)."""
    from xlt.tokenizer.embeddings import is_tied

    return bool(getattr(model.config, "tie_word_embeddings", False)) and is_tied(model)


def lora_config(model: Any, settings: LoraSettings, new_token_ids: list[int]) -> Any:
    """The peft ``LoraConfig`` for ``model``: LoRA on the target linears, the new rows per ``lora_new_rows``.

    ``new_token_ids`` empty means no new rows: plain LoRA, embeddings frozen.
    """
    from peft import LoraConfig

    rows = int(model.get_input_embeddings().weight.shape[0])
    ids = sorted({int(i) for i in new_token_ids})
    if ids and (ids[0] < 0 or ids[-1] >= rows):
        raise XltError(f"lora: new token ids must lie in [0, {rows}) (the embedding rows), got {ids[0]}..{ids[-1]}")
    check_lora_targets(model, settings)
    embed, head = embedding_names(model)
    tied = _is_tied(model)
    extra: dict[str, Any] = {}
    if ids and settings.lora_new_rows == "trainable_tokens":
        # Tied (SmolLM2): only the embedding is named. peft then wraps the head too, as a *tied*
        # TrainableTokensLayer that owns no parameter and reads the embedding adapter's
        # ``trainable_tokens_delta`` (both forward passes write the same rows into a copy of the one
        # shared weight), so the pair stays tied and the rows train from both ends. Naming both here
        # would take the same path (peft drops the tied head when the indices match).
        # Untied: each matrix gets its own delta for the same rows.
        extra["trainable_token_indices"] = {embed: ids} if tied or head is None else {embed: ids, head: ids}
    elif ids:
        # Tied: ensure_weight_tying makes peft give the head wrapper the *same* trainable copy as the
        # embedding wrapper (one V x d parameter, as in the base model). Without it the tie would break.
        extra["modules_to_save"] = [embed] + ([head] if head is not None else [])
        extra["ensure_weight_tying"] = tied
    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=settings.lora_target_modules, bias="none", task_type="CAUSAL_LM", **extra)


def apply_lora(model: Any, settings: LoraSettings, new_token_ids: list[int], seed: int = 0) -> Any:
    """Wrap ``model`` in a peft model ready for transformers' Trainer.

    Guarantees: the base weights are frozen; trainable are the LoRA A/B matrices and, per
    ``lora_new_rows``, the rows ``new_token_ids`` of the embedding (and untied head) or the whole
    embedding and head. LoRA B starts at zero, so the wrapped model computes what ``model`` did.
    LoRA A's random initialisation is drawn from ``seed`` alone (the process's own random state is left as it
    was), so every process draws the same matrices: DDP broadcasts rank 0's, but under FSDP2 each process keeps
    its own shard of what it drew, and a process-dependent draw would make the model depend on the launcher.
    """
    import torch
    from peft import get_peft_model

    config = lora_config(model, settings, new_token_ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


# ---------------------------------------------------------------------------------------------
# Merge (pure, on a gathered state dict)
# ---------------------------------------------------------------------------------------------
def _cfg(peft_config: Any) -> dict:
    return dict(peft_config) if isinstance(peft_config, dict) else peft_config.to_dict()


def _token_indices(cfg: dict, module: str) -> list[int]:
    """The token ids trained in ``module`` (a full name), from ``trainable_token_indices``."""
    tti = cfg.get("trainable_token_indices")
    if isinstance(tti, dict):
        for key, ids in tti.items():
            if module == key or module.endswith("." + key) or key.endswith("." + module):
                return list(ids)
        if len(tti) == 1:  # a tied head follows the embedding adapter (peft names only the embedding)
            return list(next(iter(tti.values())))
        raise ValueError(f"trainable tokens of {module!r}: no entry in trainable_token_indices {list(tti)}")
    if tti:
        return list(tti)
    raise ValueError(f"state dict has trainable tokens for {module!r} but the config has no trainable_token_indices")


def merged_state_dict(peft_state_dict: dict, peft_config: Any, adapter_name: str = "default") -> dict:
    """The base model's state dict with the adapter merged in, from a full peft state dict. Pure.

    ``peft_state_dict``: keys as ``peft_model.state_dict()`` gives them (what accelerate's
    ``get_state_dict`` returns on rank 0), full tensors (not DTensors). ``peft_config``: the
    ``LoraConfig`` (or its ``to_dict()``), i.e. ``peft_model.peft_config[adapter_name]``.

    Returns keys as the base model's ``state_dict()``, equal to ``merge_and_unload()``'s: each LoRA
    linear becomes ``W + (alpha / r) * B @ A`` (computed in float32, cast to W's dtype), trainable
    token rows are written over the embedding/head rows, a ``modules_to_save`` copy replaces its
    original. The inputs are not modified. Plain LoRA only (no DoRA, rank/alpha patterns, biases).
    """
    import torch

    cfg = _cfg(peft_config)
    for key in ("use_dora", "alpha_pattern", "rank_pattern", "use_qalora", "lora_bias"):
        if cfg.get(key):
            raise ValueError(f"merged_state_dict: peft option {key} is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError("merged_state_dict: peft option bias must be 'none'")
    out, lora, deltas, saved = _split_peft_keys(peft_state_dict, adapter_name)
    alpha, rslora = float(cfg["lora_alpha"]), bool(cfg.get("use_rslora"))
    for module, ab in lora.items():
        if set(ab) != {"A", "B"} or f"{module}.weight" not in out:
            raise ValueError(f"merged_state_dict: incomplete LoRA layer {module!r}")
        weight, r = out[f"{module}.weight"], ab["A"].shape[0]
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        delta = (ab["B"].float() @ ab["A"].float()) * scale
        if cfg.get("fan_in_fan_out"):
            delta = delta.T
        out[f"{module}.weight"] = (weight.float() + delta.to(weight.device)).to(weight.dtype)
    out.update(saved)
    for module, rows in deltas.items():
        weight = out[f"{module}.weight"]
        index = torch.tensor(_token_indices(cfg, module), dtype=torch.long, device=weight.device)
        if index.numel() != rows.shape[0]:
            raise ValueError(f"merged_state_dict: {module} has {rows.shape[0]} trainable rows for {index.numel()} ids")
        out[f"{module}.weight"] = weight.index_copy(0, index, rows.to(weight))
    return out


def _split_peft_keys(peft_state_dict: dict, adapter_name: str) -> tuple[dict, dict, dict, dict]:
    """A peft state dict sorted by what each key is: (base-model keys with their plain weights, LoRA ``{module:
    {"A", "B"}}``, trainable-token row deltas by module, ``modules_to_save`` copies by base key)."""
    a = re.escape(adapter_name)
    pat_lora = re.compile(rf"^(.*)\.lora_([AB])\.{a}\.weight$")
    pat_tok_delta = re.compile(rf"^(.*)\.token_adapter\.trainable_tokens_delta\.{a}$")
    pat_tok_base = re.compile(r"^(.*)\.token_adapter\.base_layer\.([^.]+)$")
    pat_save = re.compile(rf"^(.*)\.modules_to_save\.{a}\.([^.]+)$")
    pat_orig = re.compile(r"^(.*)\.original_module\.([^.]+)$")
    pat_base = re.compile(r"^(.*)\.base_layer\.([^.]+)$")
    adapter_words = ("lora_", "modules_to_save", "trainable_tokens", "token_adapter", "original_module")
    out: dict[str, Any] = {}
    lora: dict[str, dict[str, Any]] = {}
    deltas: dict[str, Any] = {}
    saved: dict[str, Any] = {}
    for key, value in peft_state_dict.items():
        if type(value).__name__ == "DTensor":
            raise ValueError(f"merged_state_dict: {key} is a DTensor; gather the full state dict first")
        if not key.startswith(_PEFT_PREFIX):
            raise ValueError(f"merged_state_dict: {key!r} is not a peft model key (no {_PEFT_PREFIX!r} prefix)")
        key = key[len(_PEFT_PREFIX):]
        if m := pat_lora.match(key):
            lora.setdefault(m[1], {})[m[2]] = value
        elif m := pat_tok_delta.match(key):
            deltas[m[1]] = value
        elif m := pat_tok_base.match(key):
            out[f"{m[1]}.{m[2]}"] = value
        elif m := pat_save.match(key):
            saved[f"{m[1]}.{m[2]}"] = value
        elif m := pat_orig.match(key):
            out.setdefault(f"{m[1]}.{m[2]}", value)
        elif m := pat_base.match(key):
            out[f"{m[1]}.{m[2]}"] = value
        elif any(w in key for w in adapter_words):
            raise ValueError(f"merged_state_dict: unexpected adapter key {key!r} (adapter {adapter_name!r}, plain LoRA)")
        else:
            out[key] = value
    return out, lora, deltas, saved


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------
def save_merged(model_config: Any, merged_sd: dict, tokenizer: Any, out_dir: str) -> None:
    """Write a plain model folder (safetensors + config + tokenizer) that ``from_pretrained`` loads.

    The model is built on the meta device and the merged tensors are *assigned* into it (no second
    copy of the weights). Tied embeddings: the head must equal the embedding (checked) and is
    re-tied, so it is saved once. The folder appears atomically.
    """
    import torch

    from xlt.io import atomic_save_dir

    model = meta_model(model_config)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(merged_sd)), sorted(set(merged_sd) - expected)
    if missing or extra:
        raise ValueError(f"save_merged: state dict does not fit the config (missing {missing[:3]}, extra {extra[:3]})")
    model.load_state_dict(merged_sd, strict=True, assign=True)
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        if not torch.equal(emb, head):
            raise ValueError("save_merged: tie_word_embeddings is set but the merged head differs from the embedding")
        model.get_output_embeddings().weight = emb
    dtype = model.get_input_embeddings().weight.dtype
    model.config.dtype = dtype

    def save(tmp: str) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    atomic_save_dir(save, out_dir)
