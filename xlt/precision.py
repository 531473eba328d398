"""The compute precision of a run, decided from the recipe's flags and the device it runs on.

Below the recipe parser (``xlt.config.parse_recipe`` settles the precision while parsing) and above nothing of xlt.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional


def truthy(value: Any) -> bool:
    """A flag given as text (environment variables, accelerate config values): 1 / true / yes / on."""
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _cuda_bf16() -> tuple[bool, str]:
    """(whether CUDA is here and computes in bf16, the device's name)."""
    import torch

    if not torch.cuda.is_available():
        return False, "cpu"
    return bool(torch.cuda.is_bf16_supported()), f"cuda ({torch.cuda.get_device_name()})"


def resolve_precision(given: Mapping[str, Any], use_cpu: Any, precision: Optional[str] = None,
                      env: Optional[Mapping[str, str]] = None, device=_cuda_bf16) -> dict:
    """The compute precision of a run: {'precision': 'bf16' | 'fp16' | 'fp32', 'source': how it was decided}.

    A recipe that sets ``bf16`` or ``fp16`` (``given``: the values it gives, None when left out) keeps them
    (source 'recipe'; bf16 on a CPU with ``use_cpu`` runs as CPU autocast, as before). Left out, it follows
    the device: bf16 on a CUDA GPU that computes in it, else fp32 (source 'auto: <device>'), instead of
    TrainingArguments' fixed False or SFTConfig's fixed True (which stops a CPU machine). Every process of a
    launch sees the same kind of device, so every rank decides alike. ``precision``: the caller's decision
    for hardware it is not running on (``xlt check``).
    """
    env = os.environ if env is None else env
    if given.get("fp16") is not None and truthy(given["fp16"]):
        return {"precision": "fp16", "source": "recipe"}
    if given.get("bf16") is not None:
        return {"precision": "bf16" if truthy(given["bf16"]) else "fp32", "source": "recipe"}
    if given.get("fp16") is not None:
        return {"precision": "fp32", "source": "recipe"}
    if precision is not None:
        return {"precision": precision, "source": "auto: checked hardware"}
    if truthy(use_cpu) or truthy(env.get("ACCELERATE_USE_CPU", "false")):
        return {"precision": "fp32", "source": "auto: cpu (use_cpu)"}
    bf16, name = device()
    return {"precision": "bf16" if bf16 else "fp32", "source": f"auto: {name}"}


def precision_of(training_args: Any) -> dict:
    """The precision decision ``parse_recipe`` recorded, or the flags' own for arguments built elsewhere."""
    decided = getattr(training_args, "xlt_precision", None)
    if decided:
        return dict(decided)
    flag = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"
    return {"precision": flag, "source": "recipe"}
