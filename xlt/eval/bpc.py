"""Bits per character: a language-model metric that does not depend on the tokenizer.

Per-token perplexity rewards a tokenizer that cuts text into more, easier pieces; bits per
character divides the total information (sum of -log2 p over every token of the text) by the
number of characters, so a base model and its extended-vocabulary child compare fairly.

Every token of a document is predicted exactly once: the first from a BOS (or EOS) context, and a
long document in windows of ``max_length`` where each window is conditioned on the token before it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch


def _context_token(tokenizer: Any) -> int:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("tokenizer has neither a BOS nor an EOS token to condition the first token on")


def _windows(ids: list[int], start: int, max_length: int) -> list[tuple[list[int], int]]:
    """Split [start] + ids into (window, n_context) pairs; each token of ids predicted once."""
    seq = [start] + ids
    out, pos = [], 1  # pos: index in seq of the next token to predict
    while pos < len(seq):
        end = min(len(seq), pos + max_length - 1)
        out.append((seq[pos - 1 : end], 1))
        pos = end
    return out


@torch.no_grad()
def bits_per_char(model: Any, tokenizer: Any, texts: Sequence[str], max_length: int = 1024,
                  batch_size: int = 8) -> dict:
    """Return ``{"bits_per_char", "chars", "tokens", "bits"}`` over ``texts``."""
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("bits_per_char: no non-empty text to evaluate")
    start = _context_token(tokenizer)
    windows: list[list[int]] = []
    n_tokens = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n_tokens += len(ids)
        windows.extend(w for w, _ in _windows(ids, start, max_length))
    chars = sum(len(t) for t in texts)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nats = 0.0
    order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
    for b in range(0, len(order), batch_size):
        batch = [windows[i] for i in order[b : b + batch_size]]
        width = max(len(w) for w in batch)
        input_ids = torch.full((len(batch), width), start, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, w in enumerate(batch):
            input_ids[r, : len(w)] = torch.tensor(w)
            mask[r, : len(w)] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = input_ids[:, 1:]
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        total_nats += float((nll * mask[:, 1:]).sum())
    if was_training:
        model.train()
    bits = total_nats / math.log(2)
    return {"bits_per_char": bits / chars, "chars": chars, "tokens": n_tokens, "bits": bits}


def bpc_by_language(model: Any, tokenizer: Any, texts_by_lang: dict[str, Iterable[str]], **kwargs: Any) -> dict:
    """``{lang: bits_per_char}`` for each language's held-out texts."""
    return {lang: round(bits_per_char(model, tokenizer, list(texts), **kwargs)["bits_per_char"], 4)
            for lang, texts in texts_by_lang.items()}
