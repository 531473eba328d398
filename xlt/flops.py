"""Compute accounting: effective parameters of a model and the training FLOPs of a run (``6 * N_eff * tokens``).

Partial training (recipe keys ``train_layers_first`` / ``train_layers_last`` / ``partial_training_fraction``,
xlt/train/partial.py) costs less per token, and is charged what the graph computes. Per parameter and token: the
forward is 2 FLOPs; the backward is 2 for the gradient of its input activation, needed when anything trainable lies
below it in the stack (input embedding, decoder layers in order, then the final norm and the output head), and 2
for its own weight gradient, needed when it is trainable. So a trainable weight costs 6, a frozen one with something
trainable below it 4, a frozen one with nothing trainable below it (a frozen prefix: autograd builds no graph for
it, the token ids require no gradient) 2. The input embedding is a lookup and costs nothing, but being trainable it
makes everything above it need activation gradients: in both partial recipes (2x2 LS, 2-stage) the embeddings
train, so no frozen prefix exists and every frozen weight costs 4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

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


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers of a transformers model, bottom to top (its ``GradientCheckpointingLayer`` modules)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise XltError(f"{type(model).__name__}: no decoder layers found (transformers' GradientCheckpointingLayer)")
    return layers


def partial_trainable(model: Any, first: int, last: int) -> set[int]:
    """``id()`` of the parameters that train in the partial phase: the input embedding, the output head and the
    parameters of the first ``first`` and last ``last`` decoder layers."""
    layers = decoder_layers(model)
    if first + last > len(layers):
        raise XltError(f"train_layers_first={first} + train_layers_last={last} is more than the model's "
                       f"{len(layers)} decoder layers")
    keep = [model.get_input_embeddings(), model.get_output_embeddings(), *layers[:first],
            *layers[len(layers) - last:]]
    return {id(p) for m in keep if m is not None for p in m.parameters()}


def partial_flops_per_token(model: Any, trainable: set[int]) -> float:
    """Training FLOPs per token when only the parameters in ``trainable`` (``id()``) train (module docstring):
    6 per trainable parameter, 4 per frozen one with something trainable below it, 2 per frozen one without; the
    input embedding counts only as a place in the stack, the head as its ``rows x hidden`` matmul."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    head = out.weight if out is not None else inp.weight
    layers = decoder_layers(model)
    in_layers = {id(p) for m in layers for p in m.parameters()}
    rest = [p for p in model.parameters() if id(p) not in in_layers and p is not inp.weight and p is not head]
    stack = [list(m.parameters()) for m in layers] + [rest, [head]]  # bottom to top, above the embedding
    below = id(inp.weight) in trainable  # something trainable lies below the current block
    total = 0.0
    for block in stack:
        for p in block:
            total += p.numel() * (6 if id(p) in trainable else 4 if below else 2)
        below = below or any(id(p) in trainable for p in block)
    return total


def model_partial_flops(model_dir: str, first: int, last: int, trust_remote_code: bool = False) -> float:
    """``partial_flops_per_token`` of the model in ``model_dir`` with the partial phase's trainable set (meta
    device: only the config is read)."""
    from transformers import AutoConfig

    model = meta_model(AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code))
    return partial_flops_per_token(model, partial_trainable(model, first, last))


def partial_steps(fraction: float, max_steps: int) -> int:
    """Optimizer steps of the partial phase: the first ``ceil(fraction * max_steps)`` (0: none)."""
    return min(max_steps, math.ceil(fraction * max_steps)) if fraction > 0 else 0


def training_flops(n_eff: float, tokens: float, init_flops: float = 0.0, partial_tokens: float = 0.0,
                   partial_per_token: float = 0.0) -> float:
    """FLOPs of an arm: ``6 * n_eff * tokens + init_flops``, where the first ``partial_tokens`` of the ``tokens``
    (the partial-training phase) cost ``partial_per_token`` each instead of ``6 * n_eff``."""
    partial_tokens = min(partial_tokens, tokens)
    return 6.0 * n_eff * (tokens - partial_tokens) + partial_per_token * partial_tokens + init_flops


def solve_tokens(budget: float, n_eff: float, init_flops: float, tokens_per_step: int,
                 partial: Optional[tuple[float, float]] = None) -> tuple[int, int]:
    """``(steps, tokens)`` so ``training_flops`` is as close to ``budget`` as whole optimizer steps of
    ``tokens_per_step`` allow (at least one step); ``partial`` is ``(fraction, FLOPs per token)`` of a partial
    phase over the first ``partial_steps(fraction, steps)``. ``XltError`` if the init alone spends the budget."""
    left = budget - init_flops
    if left <= 0:
        raise XltError(f"the init cost ({init_flops:.3g} FLOPs) is not below the budget ({budget:.3g} FLOPs)")
    fraction, per_token = partial if partial is not None else (0.0, 0.0)

    def cost(steps: int) -> float:
        part = partial_steps(fraction, steps) * tokens_per_step
        return training_flops(n_eff, steps * tokens_per_step, 0.0, part, per_token)

    rate = fraction * per_token + (1 - fraction) * 6.0 * n_eff if fraction > 0 else 6.0 * n_eff
    guess = max(1, round(left / rate / tokens_per_step))
    # The phase's step count rounds up, so the cost of a step count is not linear: the closest of the neighbours.
    steps = min(range(max(1, guess - 2), guess + 3), key=lambda s: (abs(cost(s) - left), s))
    return steps, steps * tokens_per_step


def flops_spread(flops: Sequence[float]) -> float:
    """(max - min) / min of the arms' FLOPs: 0 when equal."""
    return (max(flops) - min(flops)) / min(flops)
