"""Resolve a model spec (hub id, local directory, embedded alias) and load model + tokenizer."""

from __future__ import annotations

import os
import re
from typing import Any, Optional

from xlt.config import EMBEDDED_MODEL, XltError

EMBEDDED_ALIASES = (EMBEDDED_MODEL,)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_model(spec: str) -> str:
    """Return a path or hub id that ``from_pretrained`` accepts; convert the embedded model once.

    Checked without loading anything: an existing directory must hold a ``config.json`` or a
    ``tokenizer.json``; anything else must be the embedded alias or look like ``org/name``.
    """
    if not spec:
        raise XltError("model: empty model spec")
    if spec in EMBEDDED_ALIASES:
        from xlt.embedded import embedded_model_dir

        return str(embedded_model_dir())
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "tokenizer.json", "tokenizer_config.json")):
            raise XltError(f"model: {spec} is a directory without config.json or tokenizer files")
        return path
    if os.path.exists(path) or spec.startswith((".", "/", "~")):
        raise XltError(f"model: {spec} is not a model directory")
    if not _HUB_ID.match(spec):
        raise XltError(f"model: unknown model {spec!r}: not a directory, not an 'org/name' hub id, "
                       f"and not an embedded alias ({', '.join(EMBEDDED_ALIASES)})")
    return spec


def check_model_spec(spec: str) -> None:
    """Validate a spec without converting or downloading anything (for early input checks)."""
    if spec in EMBEDDED_ALIASES:
        from xlt.embedded import gguf_path

        gguf_path()
        return
    resolve_model(spec)  # directories and hub ids are checked without loading anything


def resolve_revision(spec: str, revision: Optional[str]) -> str:
    """A hub model at a pinned revision, as a local snapshot every later stage (tokenizer, model) reads.

    Without a revision (or for a local directory / the embedded alias) the spec is returned unchanged.
    """
    if not revision or spec in EMBEDDED_ALIASES or os.path.isdir(os.path.expanduser(spec)):
        return spec
    from huggingface_hub import snapshot_download

    return snapshot_download(spec, revision=revision,
                             allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"])


def pick_dtype(name: str = "auto"):
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
                "fp32": torch.float32, "float16": torch.float16}[name]
    except KeyError:
        raise XltError(f"torch_dtype: unknown dtype {name!r}") from None


def load_tokenizer(spec: str, trust_remote_code: bool = False, revision: Optional[str] = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(spec), trust_remote_code=trust_remote_code, revision=revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str, torch_dtype: str = "auto", attn_implementation: Optional[str] = None,
               trust_remote_code: bool = False, revision: Optional[str] = None) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": pick_dtype(torch_dtype), "trust_remote_code": trust_remote_code,
                              "use_safetensors": True}
    if revision:
        kwargs["revision"] = revision
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(resolve_model(spec), **kwargs)


def meta_model(config: Any) -> Any:
    """The model of ``config`` with no storage (meta device): cheap, for inspecting module names."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def generate_greedy(model: Any, ids: list[int], stop_ids: list[int], pad_id: int, max_new_tokens: int,
              streamer: Any = None, synced_gpus: bool = False) -> list[int]:
    """Greedy continuation of ``ids`` (the new tokens, the stop token excluded)."""
    import torch

    device = next(model.parameters()).device
    inp = torch.tensor([ids], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id, use_cache=True,
                             streamer=streamer, synced_gpus=synced_gpus)
    new = out[0, len(ids):].tolist()
    for i, t in enumerate(new):
        if t in stop_ids:
            return new[:i]
    return new
