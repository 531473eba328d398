"""Bits per character (and per UTF-8 byte): language-model metrics that do not depend on the tokenizer.

Per-token perplexity rewards a tokenizer that cuts text into more, easier pieces; bits per
character divides the total information (sum of -log2 p over every token of the text) by the
number of characters, so a base model and its extended-vocabulary child compare fairly. Bits per
byte divides by the UTF-8 bytes instead (the unit of byte-level models and of most papers).

Every token of a document is scored exactly once, the first from a BOS (or EOS) context. A document
longer than one window is read with a **sliding window** (as Hugging Face's perplexity guide and
lm-eval's rolling log-likelihood): windows of ``max_length`` tokens whose ends advance by
``stride``; the first window scores all its tokens, each later window only its last ``stride``
tokens, so every scored token sees at least ``max_length - stride`` tokens of context. The default
stride is ``max_length // 2`` (at least half a window of context for twice the forward passes of
disjoint windows); ``stride = max_length - 1`` is the old disjoint reading (one token of context).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch


def context_token(tokenizer: Any) -> int:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("tokenizer has neither a BOS nor an EOS token to condition the first token on")


def resolve_stride(max_length: int, stride: Optional[int]) -> int:
    """The stride to use: ``max_length // 2`` by default; must lie in ``[1, max_length - 1]``."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (got {max_length})")
    stride = max(1, max_length // 2) if stride is None else int(stride)
    if not 1 <= stride <= max_length - 1:
        raise ValueError(f"stride must lie in [1, max_length - 1 = {max_length - 1}] (got {stride})")
    return stride


def _windows(ids: list[int], start: int, max_length: int, stride: Optional[int] = None) -> list[tuple[list[int], int]]:
    """Split ``[start] + ids`` into ``(window, n_scored)`` pairs.

    A window holds at most ``max_length`` tokens; its last ``n_scored`` tokens are scored (predicted
    from the tokens before them in the window). Guarantees: every token of ``ids`` is scored exactly
    once and in order; the first window scores all its tokens; a token scored in a later window sees
    at least ``max_length - stride`` tokens of context.
    """
    stride = resolve_stride(max_length, stride)
    seq = [start] + ids
    out: list[tuple[list[int], int]] = []
    end = min(len(seq), max_length)
    if end > 1:
        out.append((seq[:end], end - 1))
    while end < len(seq):
        new_end = min(len(seq), end + stride)
        out.append((seq[max(0, new_end - max_length):new_end], new_end - end))
        end = new_end
    return out


@torch.no_grad()
def scored_nats(model: Any, windows: list[tuple[list[int], int]], pad: int, batch_size: int) -> list[float]:
    """Sum of -ln p over the last ``n`` tokens of each ``(tokens, n)`` window (same order), in padded batches
    sorted by length. Shared by bits per character (sliding windows) and multiple choice (continuations)."""
    device = next(model.parameters()).device
    out = [0.0] * len(windows)
    order = sorted(range(len(windows)), key=lambda i: len(windows[i][0]))
    for b in range(0, len(order), batch_size):
        idx = order[b: b + batch_size]
        width = max(len(windows[i][0]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        score = torch.zeros((len(idx), width - 1), dtype=torch.bool)  # over targets 1..width-1
        for r, i in enumerate(idx):
            w, n = windows[i]
            input_ids[r, : len(w)] = torch.tensor(w)
            mask[r, : len(w)] = 1
            score[r, len(w) - 1 - n: len(w) - 1] = True
        input_ids, mask, score = input_ids.to(device), mask.to(device), score.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        sums = (nll * score).sum(dim=1).tolist()
        for r, i in enumerate(idx):
            out[i] = sums[r]
    return out


def bits_per_char(model: Any, tokenizer: Any, texts: Sequence[str], max_length: int = 1024,
                  batch_size: int = 8, stride: Optional[int] = None) -> dict:
    """Return ``{"bits_per_char", "bits_per_byte", "chars", "bytes", "tokens", "bits"}`` over ``texts``.

    Empty texts are ignored; ``stride`` defaults to ``max_length // 2`` (see the module docstring).
    """
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("bits_per_char: no non-empty text to evaluate")
    start = context_token(tokenizer)
    stride = resolve_stride(max_length, stride)
    windows: list[tuple[list[int], int]] = []
    n_tokens = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n_tokens += len(ids)
        windows.extend(_windows(ids, start, max_length, stride))
    chars = sum(len(t) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    was_training = model.training
    model.eval()
    try:
        total_nats = sum(scored_nats(model, windows, start, batch_size))
    finally:
        if was_training:
            model.train()
    bits = total_nats / math.log(2)
    return {"bits_per_char": bits / chars, "bits_per_byte": bits / n_bytes, "chars": chars, "bytes": n_bytes,
            "tokens": n_tokens, "bits": bits}
