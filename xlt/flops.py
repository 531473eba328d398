"""Compute accounting: effective parameters of a model and the training FLOPs of a run (``6 * N_eff * tokens``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xlt.errors import XltError
from xlt.models import meta_model


def effective_params(model: Any) -> dict:
    """``{"n_eff", "non_embedding", "head_rows", "hidden"}`` of a model (real or on the meta device).

    N_eff = non-embedding parameters + the output head's ``rows x hidden`` (counted even when the head is tied
    to the input embedding, since the head is a matmul while the input embedding is a free lookup).
    """
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    total = sum(p.numel() for p in model.parameters())  # a tied head is one parameter, counted once
    embedding = inp.weight.numel()
    if out is not None and out.weight is not inp.weight:
        embedding += out.weight.numel()
    head = out.weight if out is not None else inp.weight
    rows, hidden = int(head.shape[0]), int(head.shape[1])
    return {"n_eff": int(total - embedding + rows * hidden), "non_embedding": int(total - embedding),
            "head_rows": rows, "hidden": hidden}


def model_effective_params(model_dir: str, trust_remote_code: bool = False) -> dict:
    """``effective_params`` of the model in ``model_dir`` from its config alone (meta device: nothing read)."""
    from transformers import AutoConfig

    return effective_params(meta_model(AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)))


def training_flops(n_eff: float, tokens: float, init_flops: float = 0.0) -> float:
    """FLOPs of an arm: ``6 * n_eff * tokens + init_flops``."""
    return 6.0 * n_eff * tokens + init_flops


def solve_tokens(budget: float, n_eff: float, init_flops: float, tokens_per_step: int) -> tuple[int, int]:
    """``(steps, tokens)`` so ``training_flops(n_eff, tokens, init_flops)`` is as close to ``budget`` as whole
    optimizer steps of ``tokens_per_step`` allow (at least one step); ``XltError`` if the init alone spends it."""
    left = budget - init_flops
    if left <= 0:
        raise XltError(f"the init cost ({init_flops:.3g} FLOPs) is not below the budget ({budget:.3g} FLOPs)")
    steps = max(1, round(left / (6.0 * n_eff) / tokens_per_step))
    return steps, steps * tokens_per_step


def flops_spread(flops: Sequence[float]) -> float:
    """(max - min) / min of the arms' FLOPs: 0 when equal."""
    return (max(flops) - min(flops)) / min(flops)
