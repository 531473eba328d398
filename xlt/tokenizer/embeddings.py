"""Resize a causal LM's embeddings and initialise the new rows (input and output, tied or untied).

We never let transformers initialise anything: the matrices are rebuilt here row by row from the
old ones (kept rows copied bit for bit), and only then put into the model. That sidesteps
``resize_token_embeddings``' random/mean-resizing init, and its habit of re-initialising an untied
output head (transformers #35141).

Input-side methods (``embedding_init``):

* ``subword_mean``: the mean of the old rows of the token's pieces (the old BPE run on its string);
* ``merge_tree``: bottom-up in merge order, the mean of the rows of the two tokens the new token's
  merge joins (each an old row or an earlier new one), so a token ``(ab)c`` gets
  ``((a + b) / 2 + c) / 2``, weighting its later-merged parts more than the flat mean does;
* ``mean`` (the old mean row), ``random`` (old std);
* ``distill``: ``subword_mean``, then :func:`distill_new_rows` fits the new input rows on text;
* ``align`` (Yamaguchi et al. 2024, "How Can We Effectively Expand the Vocabulary of LLMs with 0.01GB of Target
  Language Text?"): the frequency-weighted mean of the old rows of every old token that an occurrence of the new
  token overlaps, by character offsets, when the target text is tokenized by both tokenizers
  (:func:`align_weights`); a new token the text never shows falls back to its subword mean.

Output-side methods for an untied head (``output_embedding_init``): ``same`` (as the input side),
``first_subtoken`` (the output row of the first piece, EEVE), ``char_weighted_mean`` (the pieces'
output rows weighted by their lengths in characters) or ``calibrated_first_subtoken`` (the first piece's
row plus a bias, see :func:`continuation_stats`). :func:`untie` makes a tied model untied first.
"""

from __future__ import annotations

import math
import random as _random
import time
from collections.abc import Sequence
from typing import Any, Optional

import torch

from xlt.config import EMBEDDING_INITS, OUTPUT_EMBEDDING_INITS, XltError

INIT_METHODS = EMBEDDING_INITS
OUTPUT_METHODS = OUTPUT_EMBEDDING_INITS
DISTILL_BATCH = 4     # windows per distillation step
DISTILL_WINDOW = 16   # tokens (extended tokenizer) per window
DISTILL_MAX_CHARS = 400_000  # corpus characters scanned for windows
DISTILL_LR_SCALE = 0.01  # Adam LR = this x the std of the old input rows (how it was chosen: bench/README.md)
CALIBRATION_TOKENS = 8192  # old-vocabulary tokens the base model reads for calibrated_first_subtoken
CALIBRATION_WINDOW = 256   # tokens per forward pass there
CALIBRATION_RIDGE = 1.0    # ridge of the least-squares fit of the bias direction


def is_tied(model: Any) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def padded_size(n: int, multiple: int) -> int:
    return n if multiple <= 1 else int(math.ceil(n / multiple) * multiple)


def untie(model: Any) -> bool:
    """Give a tied model's output head its own copy of the embedding matrix; True when it untied.

    Guarantees: logits are bit-identical before and after (same values, new storage);
    ``config.tie_word_embeddings`` becomes False so ``tie_weights`` (called by ``resize_token_embeddings``)
    and ``save_pretrained`` / ``from_pretrained`` keep the two matrices apart. An untied model is left alone.
    """
    if not is_tied(model):
        return False
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_cfg = model.config.get_text_config()
    if text_cfg is not model.config:
        text_cfg.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):  # transformers 5 caches the tie mapping at init
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return True


def char_lengths(pieces: Sequence[bytes]) -> list[float]:
    """Length in characters of each piece of one token, given the pieces' bytes in order.

    A byte-level piece may hold part of a multi-byte UTF-8 character: each byte counts ``1 / n`` of
    its character (``n`` from the lead byte), so the lengths add up to the token's characters. Bytes
    that continue a character begun before the token (no lead byte in it) count ``1 / (run + 1)``,
    ``run`` being how many such bytes open the token (the shortest character they can belong to).
    Invalid bytes count 1 each.
    """
    data = b"".join(pieces)
    weight = [1.0] * len(data)
    i = 0
    while i < len(data) and 0x80 <= data[i] < 0xC0:  # orphan continuation bytes at the start
        i += 1
    for k in range(i):
        weight[k] = 1.0 / (i + 1)
    while i < len(data):
        b = data[i]
        n = 1 if b < 0x80 else 2 if 0xC0 <= b < 0xE0 else 3 if 0xE0 <= b < 0xF0 else 4 if 0xF0 <= b < 0xF8 else 1
        j = i + 1
        while j < len(data) and j < i + n and 0x80 <= data[j] < 0xC0:
            j += 1
        for k in range(i, j):
            weight[k] = 1.0 / n if n > 1 else 1.0
        i = j
    out, at = [], 0
    for p in pieces:
        out.append(sum(weight[at: at + len(p)]))
        at += len(p)
    return out


def _init_matrix(old: torch.Tensor, new_size: int, keep: dict[int, int], pieces: dict[int, list[int]],
                 method: str, generator: torch.Generator, merges: Optional[list[tuple[int, int, int]]] = None,
                 piece_bytes: Optional[dict[int, list[bytes]]] = None,
                 calibration: Optional[dict] = None, align: Optional[dict[int, dict[int, int]]] = None) -> torch.Tensor:
    """A (new_size, dim) matrix: kept rows copied; the rest initialised by ``method``.

    Rows with no pieces (padding, or a token the old tokenizer cannot express) get the old mean:
    by Jensen's inequality a mean row never out-scores the average old token on the output side.
    ``merges`` (merge_tree): ``(new id, id a, id b)`` in merge order, ids in the *new* numbering;
    a row is built from the first merge that yields it; new tokens no merge yields (SentencePiece-style
    single characters) keep their subword mean. ``piece_bytes`` (char_weighted_mean): each new id's
    pieces as bytes. ``calibration`` (calibrated_first_subtoken): :func:`continuation_stats`' result.
    ``align``: :func:`align_weights`' counts (new id -> {old id: overlapping occurrences}).
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
    elif method == "align":
        for i in todo:
            w = (align or {}).get(i)
            if w:
                ids = list(w)
                counts = torch.tensor([float(w[j]) for j in ids])
                new[i] = (old32[ids] * counts[:, None]).sum(0) / counts.sum()
            elif pieces.get(i):
                new[i] = old32[pieces[i]].mean(0)
    elif method in ("subword_mean", "merge_tree", "distill"):
        for i in todo:
            ids = pieces.get(i)
            if ids:
                new[i] = old32[ids].mean(0)
        if method == "merge_tree":
            built: set[int] = set()
            for r, a, b in merges or []:
                if r in keep or r in built or not 0 <= r < new_size:
                    continue
                new[r] = (new[a] + new[b]) / 2
                built.add(r)
    elif method == "first_subtoken":
        for i in todo:
            ids = pieces.get(i)
            if ids:
                new[i] = old32[ids[0]]
    elif method == "calibrated_first_subtoken":
        if calibration is None:
            raise ValueError("calibrated_first_subtoken needs continuation_stats (init_new_rows computes them)")
        u = calibration["direction"].float()
        bias = calibration["logprob"]
        for i in todo:
            ids = pieces.get(i)
            if ids:
                new[i] = old32[ids[0]] + bias.get(i, 0.0) * u
    elif method == "char_weighted_mean":
        for i in todo:
            ids = pieces.get(i)
            if ids:
                w = torch.tensor(char_lengths(piece_bytes[i]) if piece_bytes and i in piece_bytes else [1.0] * len(ids))
                new[i] = (old32[ids] * w[:, None]).sum(0) / w.sum()
    elif method != "mean":
        raise ValueError(f"unknown init method {method!r}")
    return new.to(old.dtype)


def resize_and_init(model: Any, new_size: int, keep: dict[int, int], pieces: dict[int, list[int]],
                    method: str = "subword_mean", seed: int = 0, *, output_method: str = "same",
                    untie_first: bool = False, merges: Optional[list[tuple[int, int, int]]] = None,
                    piece_bytes: Optional[dict[int, list[bytes]]] = None,
                    calibration: Optional[dict] = None, align: Optional[dict[int, dict[int, int]]] = None) -> dict:
    """Give ``model`` a vocabulary of ``new_size`` rows.

    ``keep`` maps new id -> old id for rows copied unchanged (identity for an extension, shared
    tokens for a swap); ``pieces`` maps new id -> old ids its text is made of (for subword inits).
    ``output_method`` other than 'same' initialises an untied head's new rows differently from the
    input rows; on a tied model (and no ``untie_first``) it is an ``XltError`` before anything changes.
    ``method='distill'`` initialises as subword_mean here; :func:`distill_new_rows` does the rest.
    Returns a small summary (rows kept / initialised / padding, tied or not).
    """
    if method not in INIT_METHODS:
        raise ValueError(f"unknown init method {method!r}")
    if output_method not in OUTPUT_METHODS:
        raise ValueError(f"unknown output init method {output_method!r}")
    if output_method != "same" and is_tied(model) and not untie_first:
        raise XltError(f"output_embedding_init={output_method}: the model ties its input and output embeddings; "
                       f"set untie_embeddings: true (or output_embedding_init: same)")
    untied = untie(model) if untie_first else False
    gen = torch.Generator().manual_seed(seed)
    tied = is_tied(model)
    old_in = model.get_input_embeddings().weight.detach().clone()
    new_in = _init_matrix(old_in, new_size, keep, pieces, method, gen, merges, piece_bytes, align=align)
    new_out = None
    if not tied and model.get_output_embeddings() is not None:
        old_out = model.get_output_embeddings().weight.detach().clone()
        out_method = method if output_method == "same" else output_method
        new_out = _init_matrix(old_out, new_size, keep, pieces, out_method, gen, merges, piece_bytes, calibration,
                               align=align)
    model.resize_token_embeddings(new_size, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(new_in)
        if new_out is not None:
            model.get_output_embeddings().weight.copy_(new_out)
    if tied:
        model.tie_weights()
    model.config.vocab_size = new_size
    n_init = sum(1 for i in pieces if i not in keep)
    return {"rows": new_size, "kept": len(keep), "initialised": n_init, "padding": new_size - len(keep) - n_init,
            "tied": tied, "untied": untied, "init": method, "output_init": output_method if not tied else "tied",
            "init_flops": 0}


def align_weights(texts: Sequence[str], old_tok: Any, new_tok: Any, new_ids: Sequence[int],
                  batch: int = 256) -> dict[int, dict[int, int]]:
    """For each new id, how often each old token overlaps one of its occurrences: both ``tokenizers.Tokenizer`` s
    encode ``texts`` (no special tokens); an old token overlaps a new-token occurrence when their character spans
    intersect (``old_start < new_end and old_end > new_start``). Byte pieces of one character share its span, so
    each is counted. New ids absent from the text are absent from the result."""
    wanted = set(new_ids)
    out: dict[int, dict[int, int]] = {}
    for at in range(0, len(texts), batch):
        chunk = list(texts[at: at + batch])
        for old_enc, new_enc in zip(old_tok.encode_batch(chunk, add_special_tokens=False),
                                    new_tok.encode_batch(chunk, add_special_tokens=False)):
            old_spans, j = old_enc.offsets, 0
            for nid, (s, e) in zip(new_enc.ids, new_enc.offsets):
                if nid not in wanted or e <= s:
                    continue
                while j < len(old_spans) and old_spans[j][1] <= s:  # spans are in text order
                    j += 1
                counts = out.setdefault(nid, {})
                k = j
                while k < len(old_spans) and old_spans[k][0] < e:
                    if old_spans[k][1] > s:
                        oid = old_enc.ids[k]
                        counts[oid] = counts.get(oid, 0) + 1
                    k += 1
    return {i: c for i, c in out.items() if c}


# ---------------------------------------------------------------------------------------------
# Token distillation of the new input rows
# ---------------------------------------------------------------------------------------------
def expand_ids(ids: Sequence[int], pieces: dict[int, list[int]]) -> list[int]:
    """The old-vocabulary ids of a sequence of extended ids: each new id replaced by its pieces.

    For an extension this is exactly the base tokenizer's segmentation of the same text: new merges
    only join whole old tokens, and the old BPE's merges inside such a span do not depend on what
    surrounds it (tested on real text).
    """
    out: list[int] = []
    for i in ids:
        out.extend(pieces.get(i, (i,)))
    return out


def distill_windows(texts: Sequence[str], new_tok: Any, new_ids: set[int], n: int, seed: int = 0,
                    window: int = DISTILL_WINDOW, max_chars: int = DISTILL_MAX_CHARS) -> list[list[int]]:
    """Up to ``n`` windows of ``window`` extended ids from ``texts``, each holding at least one new id.

    Deterministic for a seed. Windows that bring a new id no earlier window had come first (so as
    many new tokens as possible are seen at least once), then the rest, in a seeded shuffle.
    """
    docs, total = [], 0
    for t in texts:
        if total >= max_chars:
            break
        docs.append(t)
        total += len(t)
    cands = []
    for enc in new_tok.encode_batch(docs, add_special_tokens=False):
        ids = enc.ids
        for s in range(0, len(ids) - window + 1, window):
            w = ids[s: s + window]
            if any(i in new_ids for i in w):
                cands.append(w)
    _random.Random(seed).shuffle(cands)
    seen: set[int] = set()
    first, rest = [], []
    for w in cands:
        fresh = {i for i in w if i in new_ids} - seen
        (first if fresh else rest).append(w)
        seen |= fresh
    return (first + rest)[:n]


def _embedding_param_name(body: Any, weight: torch.Tensor) -> str:
    for name, p in body.named_parameters():
        if p is weight:
            return name
    raise ValueError("input embedding weight not found in the model body")


def _pad(seqs: list[list[int]]) -> torch.Tensor:
    """Right-padded batch (pad id 0): under causal attention, padding after a position never changes it."""
    n = max(map(len, seqs))
    return torch.tensor([s + [0] * (n - len(s)) for s in seqs])


def _pairs(window: list[int], pieces: dict[int, list[int]], new_ids: set[int]) -> tuple[list[int], list[int]]:
    """(positions in the extended window, matching positions in its expansion) scored by the loss.

    Position j of the extended window ends where position ``ends[j]`` of the old sequence ends (its last
    piece). Scored: every position from the first new token on (earlier ones are identical inputs).
    """
    ends, at = [], -1
    for i in window:
        at += len(pieces.get(i, (i,)))
        ends.append(at)
    first = next(j for j, i in enumerate(window) if i in new_ids)
    return list(range(first, len(window))), ends[first:]


class _Distiller:
    """Targets (base hidden states on the old pieces) and the student forward over the new rows only."""

    def __init__(self, model: Any, windows: list[list[int]], pieces: dict[int, list[int]], new_ids: list[int]):
        self.model = model
        self.body = model.base_model
        self.weight = model.get_input_embeddings().weight
        self.name = _embedding_param_name(self.body, self.weight)
        self.new_ids = torch.tensor(new_ids)
        new_set = set(new_ids)
        self.windows = windows
        self.pairs = [_pairs(w, pieces, new_set) for w in windows]
        self.old = [expand_ids(w, pieces) for w in windows]

    def hidden(self, batch: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Last-layer hidden states (after the final norm) of ``batch``, optionally with another embedding."""
        from torch.func import functional_call

        params = {} if weight is None else {self.name: weight}
        return functional_call(self.body, params, args=(), kwargs={"input_ids": batch, "use_cache": False}).last_hidden_state

    @torch.no_grad()
    def targets(self, idx: list[int]) -> list[torch.Tensor]:
        h = self.hidden(_pad([self.old[k] for k in idx]))
        return [h[r, self.pairs[k][1]] for r, k in enumerate(idx)]

    def loss(self, idx: list[int], targets: list[torch.Tensor], rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean squared hidden-state mismatch over the scored positions of windows ``idx``."""
        weight = None
        if rows is not None:
            weight = self.weight.detach().index_put((self.new_ids,), rows)
        h = self.hidden(torch.tensor([self.windows[k] for k in idx]), weight)
        diffs = [h[r, self.pairs[k][0]] - t for r, (k, t) in enumerate(zip(idx, targets))]
        return torch.cat(diffs).pow(2).mean()


def hidden_mismatch(model: Any, windows: list[list[int]], pieces: dict[int, list[int]], new_ids: list[int],
                    batch: int = DISTILL_BATCH) -> float:
    """Mean squared difference between the last hidden states at the scored positions of ``windows`` run with
    the extended ids and with their old pieces (what distillation minimises)."""
    d = _Distiller(model, windows, pieces, new_ids)
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(windows), batch):
            idx = list(range(s, min(len(windows), s + batch)))
            total += float(d.loss(idx, d.targets(idx))) * len(idx)
            n += len(idx)
    return total / max(1, n)


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def distill_new_rows(model: Any, texts: Sequence[str], new_tok: Any, pieces: dict[int, list[int]],
                     new_ids: list[int], steps: int, seed: int = 0, batch: int = DISTILL_BATCH,
                     window: int = DISTILL_WINDOW, lr: Optional[float] = None) -> dict:
    """Token distillation: fit the new *input* rows so the model's last hidden states on extended text match
    those on the same text in old pieces (base targets, computed once), over ``steps`` Adam steps.

    Guarantees: only rows ``new_ids`` of the input matrix change (old rows, the body and an untied head
    are bit-identical; a tied head follows its input rows, being the same tensor); deterministic for a
    seed; nothing happens when the text holds no new token. Windows: :func:`distill_windows`.

    Compute (``init_flops``), charged like training so equal-compute comparisons stay fair:
    ``2 N`` per token for each target forward on the old pieces (once per window) plus ``6 N`` per token
    per student step, ``N`` = every parameter of the model. ``6 N`` is a full forward + backward; with the
    body frozen the backward skips weight gradients (really about ``4 N``), and the embedding and head
    hold no matmul FLOPs here, so the figure is an upper bound: it never flatters distillation.
    """
    t0 = time.time()
    new_set = set(new_ids)
    windows = distill_windows(texts, new_tok, new_set, steps * batch, seed=seed, window=window)
    base = {"distill_steps": 0, "distill_windows": len(windows), "init_flops": 0, "distill_seconds": 0.0}
    if not windows:
        return base
    d = _Distiller(model, windows, pieces, new_ids)
    n_params = count_params(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()  # no dropout: the targets and the student see the same deterministic body
    try:
        targets: list[torch.Tensor] = []
        for s in range(0, len(windows), batch):
            targets.extend(d.targets(list(range(s, min(len(windows), s + batch)))))
        fwd_tokens = sum(map(len, d.old))
        rows = torch.nn.Parameter(d.weight.detach()[d.new_ids].clone())
        std = float(d.weight.detach().std())
        opt = torch.optim.Adam([rows], lr=lr if lr is not None else DISTILL_LR_SCALE * std)
        losses, step_tokens = [], 0
        for step in range(steps):
            idx = [(step * batch + k) % len(windows) for k in range(batch)]
            loss = d.loss(idx, [targets[k] for k in idx], rows)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step_tokens += batch * window
        with torch.no_grad():
            d.weight[d.new_ids] = rows.detach().to(d.weight.dtype)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    k = max(1, min(5, steps // 4))
    return {"distill_steps": steps, "distill_windows": len(windows),
            "distill_rows_seen": len({i for w in windows for i in w if i in new_set}),
            "distill_loss_first": round(sum(losses[:k]) / k, 6), "distill_loss_last": round(sum(losses[-k:]) / k, 6),
            "distill_tokens": {"forward": fwd_tokens, "forward_backward": step_tokens},
            "init_flops": float(2 * n_params * fwd_tokens + 6 * n_params * step_tokens),
            "distill_seconds": round(time.time() - t0, 2)}


# ---------------------------------------------------------------------------------------------
# Calibrated output rows: the base model's probability of a new token's whole piece sequence
# ---------------------------------------------------------------------------------------------
def _calibration_windows(texts: Sequence[str], new_tok: Any, pieces: dict[int, list[int]], new_ids: set[int],
                         tokens: int, window: int) -> tuple[list[list[int]], list[tuple[int, int, int]]]:
    """Old-piece windows of the texts (each at most ``window`` ids, never splitting a token's pieces) up to
    ``tokens`` ids in all, and every new-token occurrence in them as ``(window, start, new id)``."""
    windows: list[list[int]] = []
    spots: list[tuple[int, int, int]] = []
    cur: list[int] = []
    total = 0

    def flush() -> None:
        nonlocal cur
        if len(cur) > 1:
            windows.append(cur)
        cur = []

    def encoded():  # in small batches: a big corpus is read only as far as the budget needs
        batch: list[str] = []
        for t in texts:
            batch.append(t)
            if len(batch) == 32:
                yield from new_tok.encode_batch(batch, add_special_tokens=False)
                batch = []
        if batch:
            yield from new_tok.encode_batch(batch, add_special_tokens=False)

    for enc in encoded():
        for i in enc.ids:
            ps = pieces.get(i, [i]) if i in new_ids else [i]
            if len(cur) + len(ps) > window:
                total += len(cur)
                flush()
                if total >= tokens:
                    return windows, spots
            if i in new_ids and len(ps) > 1:
                spots.append((len(windows), len(cur), i))
            cur.extend(ps)
        total += len(cur)
        flush()  # windows do not cross documents
        if total >= tokens:
            break
    return windows, spots


@torch.no_grad()
def _fill_unseen(logprob: dict[int, float], pieces: dict[int, list[int]], new_ids: Sequence[int]) -> dict[int, float]:
    """Continuation log-probabilities for the new ids never seen in the calibration text (and of more than one
    piece): the mean of the seen ids with as many pieces, else of all seen ids. Nothing seen: left empty."""
    if not logprob:
        return logprob
    by_len: dict[int, list[float]] = {}
    for i, v in logprob.items():
        by_len.setdefault(len(pieces[i]), []).append(v)
    overall = sum(logprob.values()) / len(logprob)
    for i in new_ids:
        if i not in logprob and len(pieces.get(i, ())) > 1:
            same = by_len.get(len(pieces[i]))
            logprob[i] = sum(same) / len(same) if same else overall
    return logprob


def continuation_stats(model: Any, texts: Sequence[str], new_tok: Any, pieces: dict[int, list[int]],
                       new_ids: Sequence[int], tokens: int = CALIBRATION_TOKENS,
                       window: int = CALIBRATION_WINDOW) -> dict:
    """What ``calibrated_first_subtoken`` needs, measured with the *base* model (before any resize) on ``texts``
    written in old pieces (:func:`expand_ids`): for each new id, the mean over its occurrences of
    ``sum_{i>=2} log P_base(piece_i | text before it)`` (``logprob``), and a direction ``u`` of the final hidden
    space with ``h . u ~= 1`` for the hidden states ``h`` the head sees (``direction``, ridge least squares).

    Why: a new token's output row ``w[first piece] + c u`` has the logit ``logit(first piece) + c (h . u)``,
    about ``log P_base(first piece) + c`` before normalisation, i.e. the base model's probability of the whole
    piece sequence with the continuation's log-probability estimated context-free. Plain ``first_subtoken``
    gives every new token that shares a first piece the same logit, splitting that piece's probability evenly
    among them. A head has no bias, and ``u`` stands in for one (on SmolLM2 ``h . u`` is 0.99 +- 0.04 on
    held-out Japanese). New ids never seen get the mean of the seen ids with as many pieces (else of all);
    with no occurrence at all ``logprob`` is empty (the rows are then plain first_subtoken).

    Compute: one forward per token read, ``2 N`` FLOPs with ``N`` every parameter (``init_flops``).
    """
    t0 = time.time()
    new_set = set(new_ids)
    windows, spots = _calibration_windows(texts, new_tok, pieces, new_set, tokens, window)
    n_params = count_params(model)
    hidden = model.get_output_embeddings().weight.shape[1]
    hth = torch.zeros(hidden, hidden, dtype=torch.float64)
    ht1 = torch.zeros(hidden, dtype=torch.float64)
    by_window: dict[int, list[tuple[int, int]]] = {}
    for w, start, i in spots:
        by_window.setdefault(w, []).append((start, i))
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    was_training = model.training
    model.eval()
    try:
        for w, ids in enumerate(windows):
            x = torch.tensor([ids])
            out = model(input_ids=x, output_hidden_states=True, use_cache=False)
            h = out.hidden_states[-1][0].double()
            hth += h.T @ h
            ht1 += h.sum(0)
            logp = torch.log_softmax(out.logits[0].double(), dim=-1)
            for start, i in by_window.get(w, []):
                k = len(pieces[i])
                # piece j (j >= 1) sits at start + j and is predicted at start + j - 1
                lp = sum(float(logp[start + j - 1, ids[start + j]]) for j in range(1, k))
                sums[i] = sums.get(i, 0.0) + lp
                counts[i] = counts.get(i, 0) + 1
    finally:
        model.train(was_training)
    read = sum(map(len, windows))
    direction = torch.linalg.solve(hth + CALIBRATION_RIDGE * torch.eye(hidden, dtype=torch.float64), ht1)
    logprob = _fill_unseen({i: sums[i] / counts[i] for i in sums}, pieces, new_ids)
    fit = None
    if read:  # h . u over every position read, from the sums the fit already has (no second forward)
        mean = float(ht1 @ direction) / read
        var = max(0.0, float(direction @ hth @ direction) / read - mean * mean)
        fit = {"mean": round(mean, 4), "std": round(math.sqrt(var), 4)}
    return {"logprob": logprob, "direction": direction.float(), "calibration_tokens": read,
            "calibration_occurrences": sum(counts.values()), "calibration_rows_seen": len(counts),
            "calibration_direction_fit": fit, "init_flops": float(2 * n_params * read),
            "calibration_seconds": round(time.time() - t0, 2)}
