"""Resize a causal LM's embeddings and initialise the new rows (input and output, tied or untied).

We never let transformers initialise anything: the matrices are rebuilt here row by row from the
old ones (kept rows copied bit for bit), and only then put into the model. That sidesteps
``resize_token_embeddings``' random/mean-resizing init, and its habit of re-initialising an untied
output head (transformers #35141).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

INIT_METHODS = ("subword_mean", "mean", "random")


def is_tied(model: Any) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def padded_size(n: int, multiple: int) -> int:
    return n if multiple <= 1 else int(math.ceil(n / multiple) * multiple)


def _init_matrix(old: torch.Tensor, new_size: int, keep: dict[int, int], pieces: dict[int, list[int]],
                 method: str, generator: torch.Generator) -> torch.Tensor:
    """A (new_size, dim) matrix: kept rows copied; the rest initialised by ``method``.

    Rows with no pieces (padding, or a token the old tokenizer cannot express) get the old mean:
    by Jensen's inequality a mean row never out-scores the average old token on the output side.
    """
    old32 = old.detach().float()
    mean = old32.mean(0)
    std = float(old32.std())
    new = mean.repeat(new_size, 1)
    for new_id, old_id in keep.items():
        new[new_id] = old32[old_id]
    todo = [i for i in range(new_size) if i not in keep]
    if method == "random":
        rows = [i for i in todo if i in pieces]
        if rows:
            new[rows] = torch.randn(len(rows), old.shape[1], generator=generator) * std
    elif method == "subword_mean":
        for i in todo:
            ids = pieces.get(i)
            if ids:
                new[i] = old32[ids].mean(0)
    elif method != "mean":
        raise ValueError(f"unknown init method {method!r}")
    return new.to(old.dtype)


def resize_and_init(model: Any, new_size: int, keep: dict[int, int], pieces: dict[int, list[int]],
                    method: str = "subword_mean", seed: int = 0) -> dict:
    """Give ``model`` a vocabulary of ``new_size`` rows.

    ``keep`` maps new id -> old id for rows copied unchanged (identity for an extension, shared
    tokens for a swap); ``pieces`` maps new id -> old ids its text is made of (for subword inits).
    Returns a small summary (rows kept / initialised / padding, tied or not).
    """
    if method not in INIT_METHODS:
        raise ValueError(f"unknown init method {method!r}")
    gen = torch.Generator().manual_seed(seed)
    tied = is_tied(model)
    old_in = model.get_input_embeddings().weight.detach().clone()
    new_in = _init_matrix(old_in, new_size, keep, pieces, method, gen)
    new_out = None
    if not tied and model.get_output_embeddings() is not None:
        old_out = model.get_output_embeddings().weight.detach().clone()
        new_out = _init_matrix(old_out, new_size, keep, pieces, method, gen)
    model.resize_token_embeddings(new_size, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(new_in)
        if new_out is not None:
            model.get_output_embeddings().weight.copy_(new_out)
    if tied:
        model.tie_weights()
    model.config.vocab_size = new_size
    return {"rows": new_size, "kept": len(keep), "initialised": sum(1 for i in pieces if i not in keep),
            "padding": new_size - len(keep) - sum(1 for i in pieces if i not in keep), "tied": tied, "init": method}


def pieces_from(old_model_tokenize: Callable[[str], list[int]], new_tokens: dict[int, str]) -> dict[int, list[int]]:
    """new id -> old ids, by running the *old* BPE model on the new token's vocabulary string."""
    out = {}
    for i, s in new_tokens.items():
        ids = old_model_tokenize(s)
        if ids:
            out[i] = ids
    return out
