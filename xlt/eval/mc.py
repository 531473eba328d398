"""Japanese multiple choice (JCommonsenseQA layout) by the log-likelihood of each choice.

A row is ``{"question": str, "choice0": str, ..., "choice4": str, "label": int}`` (as JGLUE's
JCommonsenseQA). Each choice is scored as a continuation of the Japanese prompt
``"質問: {question}\\n答え: "``: raw is the sum of log-probabilities of its tokens, normalised divides that
by the number of characters of the choice (lm-eval's ``acc_norm`` idea, per character so that the
score does not depend on the tokenizer). Accuracy comes with a 95% Wilson score interval.

Written here rather than through lm-eval so that the run evaluation (``xlt evaluate run``) needs no
extra package; ``xlt evaluate harness`` runs lm-eval's own tasks when it is installed.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

import torch

from xlt.config import XltError
from xlt.eval.bpc import scored_nats

PROMPT = "質問: {question}\n答え: "
N_CHOICES = 5
Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (``(0, 1)`` when ``n == 0``); contains ``k / n``."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The exact bounds at k = 0 and k = n (rounding leaves ~1e-17 otherwise).
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def _usable(row: Any) -> Optional[dict]:
    """``{"question", "choices", "label"}`` of a JCommonsenseQA row, or None when a field is missing or bad."""
    if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
        return None
    choices = [row.get(f"choice{i}") for i in range(N_CHOICES)]
    label = row.get("label")
    if not all(isinstance(c, str) and c for c in choices) or isinstance(label, bool):
        return None
    try:
        label = int(label)
    except (TypeError, ValueError):
        return None
    if not 0 <= label < N_CHOICES:
        return None
    return {"question": row["question"], "choices": choices, "label": label}


def load_mc_rows(path: str, max_n: Optional[int] = None, key: str = "--data") -> tuple[list[dict], int]:
    """The usable rows of a JCommonsenseQA jsonl file (at most ``max_n``) and the number skipped.

    Raises a one-line ``XltError`` naming the file when it is missing, a line is not JSON, or no row
    is usable.
    """
    import os

    if not os.path.isfile(path):
        raise XltError(f"{key}: data file not found: {path}")
    rows, skipped = [], 0
    with open(path, encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = _usable(json.loads(line))
            except json.JSONDecodeError as e:
                raise XltError(f"{key}: {path}:{lineno}: invalid JSON ({e.msg})") from None
            if row is None:
                skipped += 1
                continue
            rows.append(row)
            if max_n is not None and len(rows) >= max_n:
                break
    if not rows:
        raise XltError(f"{key}: {path} has no usable multiple-choice rows (need question, choice0..choice4, "
                       f"label 0-4)")
    return rows, skipped


def _split_continuation(tokenizer: Any, context: str, continuation: str, start: int) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, as lm-eval splits them.

    Trailing spaces of the context move to the continuation; the whole string is encoded once and the
    continuation is what follows the context's tokens, so merges across the boundary are kept.
    """
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return [start] + whole[: len(ctx)], whole[len(ctx):]


@torch.no_grad()
def continuation_logprobs(model: Any, pairs: list[tuple[list[int], list[int]]], pad: int,
                          batch_size: int = 16, max_length: int = 1024) -> list[float]:
    """Sum of ln p of each continuation given its context (the context is cut from the left to fit)."""
    seqs = []
    for ctx, cont in pairs:
        seq = (ctx + cont)[-max_length:]
        seqs.append((seq, min(len(cont), len(seq) - 1)))
    return [-nats for nats in scored_nats(model, seqs, pad, batch_size)]


def _shares_prefix(model: Any) -> bool:
    """Whether ``model`` can score continuations from a shared cached context (a transformers causal LM)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return False
    return isinstance(model, PreTrainedModel) and model.can_generate()


@torch.no_grad()
def shared_prefix_logprobs(model: Any, items: list[tuple[list[int], list[list[int]]]], pad: int,
                           batch_size: int = 16) -> list[list[float]]:
    """Sum of ln p of each continuation given its context, running each context **once**.

    ``items`` are ``(context, continuations)``; every context of one call may differ in length. Why not
    lm-eval's way (one full forward pass per choice): a JCommonsenseQA prompt is ~5x longer than its
    choices, so five passes over it cost ~3x the tokens, and the logits of every prompt position (the
    vocabulary-sized matmul) are computed and thrown away. Here questions whose contexts have the same
    length are batched without padding (``batch_size`` questions a pass), the last context position's
    logits give each choice's first token, and the key/value cache, repeated once per choice, gives the
    rest (choices right-padded: padding comes after every scored token, so it changes nothing). Same
    scores as full passes up to float rounding (tested).
    """
    import inspect

    device = next(model.parameters()).device
    # transformers 5.2x renamed the forward's ``past_key_values`` to ``cache`` (the old name warns).
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out: list[list[float]] = [[] for _ in items]
    by_len: dict[tuple[int, int], list[int]] = {}
    for i, (ctx, conts) in enumerate(items):
        by_len.setdefault((len(ctx), len(conts)), []).append(i)
    for (_, k), members in sorted(by_len.items()):
        for b in range(0, len(members), batch_size):
            idx = members[b: b + batch_size]
            ctx = torch.tensor([items[i][0] for i in idx], device=device)
            res = model(input_ids=ctx, use_cache=True, logits_to_keep=1)
            first = torch.log_softmax(res.logits[:, -1].float(), dim=-1)  # (questions, vocab)
            cache = getattr(res, "cache", None) or res.past_key_values
            cache.batch_repeat_interleave(k)
            conts = [c for i in idx for c in items[i][1]]
            width = max(len(c) for c in conts)
            ids = torch.full((len(conts), width), pad, dtype=torch.long)
            for r, c in enumerate(conts):
                ids[r, : len(c)] = torch.tensor(c)
            ids = ids.to(device)
            mask = torch.ones((len(conts), ctx.shape[1] + width), dtype=torch.long, device=device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kw: cache}).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1) if width > 1 else None
            for r, c in enumerate(conts):
                q = r // k
                total = float(first[q, c[0]])
                if len(c) > 1:
                    total += float(logp[r, torch.arange(len(c) - 1), ids[r, 1: len(c)]].sum())
                out[idx[q]].append(total)
    return out


def _choice_logprobs(model: Any, pairs: list[tuple[list[int], list[int]]], k: int, pad: int, batch_size: int,
                     max_length: int) -> list[float]:
    """ln p of every (context, choice) pair; ``k`` consecutive pairs share one question's context.

    Shared-prefix scoring for transformers causal LMs when a question's prompt plus its longest choice
    fits ``max_length`` (and the tokenised contexts of its choices agree); full passes otherwise.
    """
    ll: list[Optional[float]] = [None] * len(pairs)
    shared, rest = [], []
    for q in range(0, len(pairs), k):
        group = pairs[q: q + k]
        same_ctx = all(ctx == group[0][0] for ctx, _ in group)
        fits = max(len(ctx) + len(cont) for ctx, cont in group) <= max_length
        if _shares_prefix(model) and same_ctx and fits and all(cont for _, cont in group):
            shared.append(q)
        else:
            rest.extend(range(q, q + len(group)))
    if shared:
        items = [(pairs[q][0], [cont for _, cont in pairs[q: q + k]]) for q in shared]
        for q, scores in zip(shared, shared_prefix_logprobs(model, items, pad, batch_size)):
            ll[q: q + len(scores)] = scores
    if rest:
        for i, s in zip(rest, continuation_logprobs(model, [pairs[i] for i in rest], pad, batch_size, max_length)):
            ll[i] = s
    return [float(x) for x in ll]


def multiple_choice(model: Any, tokenizer: Any, rows: list[dict], batch_size: int = 16,
                    max_length: int = 1024, prompt: str = PROMPT) -> dict:
    """Accuracy of ``rows`` (from :func:`load_mc_rows`) by raw and per-character log-likelihood.

    Returns ``{"accuracy", "accuracy_norm", "n", "ci95", "ci95_norm", "scores"}`` where ``scores`` holds,
    per row, the raw log-likelihood of each choice. Ties go to the first choice (``argmax``).
    """
    from xlt.eval.bpc import context_token

    if not rows:
        raise ValueError("multiple_choice: no rows")
    start = context_token(tokenizer)
    pairs = [_split_continuation(tokenizer, prompt.format(question=r["question"]), c, start)
             for r in rows for c in r["choices"]]
    was_training = model.training
    model.eval()
    try:
        ll = _choice_logprobs(model, pairs, N_CHOICES, start, batch_size, max_length)
    finally:
        if was_training:
            model.train()
    correct = correct_norm = 0
    scores = []
    pos = 0
    for r in rows:
        k = len(r["choices"])
        raw = ll[pos: pos + k]
        pos += k
        norm = [s / len(c) for s, c in zip(raw, r["choices"])]
        correct += int(max(range(k), key=lambda i: raw[i]) == r["label"])
        correct_norm += int(max(range(k), key=lambda i: norm[i]) == r["label"])
        scores.append(raw)
    n = len(rows)
    return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "n": n,
            "ci95": list(wilson_interval(correct, n)), "ci95_norm": list(wilson_interval(correct_norm, n)),
            "scores": scores}


def mc_json(model_spec: str, data: str, max_n: Optional[int] = None, batch_size: int = 16, max_length: int = 1024,
            trust_remote_code: bool = False) -> dict:
    """``xlt evaluate mc``: ``{"accuracy", "accuracy_norm", "n", "ci95", "ci95_norm", "skipped", "data"}``.

    The file is read and checked before the model loads.
    """
    from xlt.models import check_model_spec, load_model, load_tokenizer

    check_model_spec(model_spec)
    if max_n is not None and max_n < 1:
        raise XltError(f"--max-n must be at least 1 (got {max_n})")
    rows, skipped = load_mc_rows(data, max_n)
    tokenizer = load_tokenizer(model_spec, trust_remote_code=trust_remote_code)
    model = load_model(model_spec, trust_remote_code=trust_remote_code)
    r = multiple_choice(model, tokenizer, rows, batch_size=batch_size, max_length=max_length)
    r.pop("scores")
    return {**r, "skipped": skipped, "data": data}
