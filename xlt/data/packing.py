"""Tokenisation conventions and packing of document pieces into fixed-length rows.

A row is ``seq_len`` slots, every slot a document token: nothing is padded, truncated or dropped.
A document that does not fit continues in the next row (or the next warmup sub-row). Each piece
of a document is a *segment*; ``position_ids`` restart at 0 at every segment, which is what
transformers' packed-sequence masking (sdpa / eager / flex, no attention mask, no cache) and flash-attn
varlen (from one flattened row, xlt/data/collate.py) use to keep attention inside a segment. The label of a segment's first token is -100: it
would otherwise be "predicted" from the previous, unrelated segment.

Sequence-length warmup in "reshape" mode cuts every row into sub-rows of the current warmup length
L (the last one shorter when L does not divide seq_len); a sub-row boundary is a segment boundary,
so attention spans at most L tokens while the batch stays rectangular and tokens per step constant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from xlt.config import XltError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenConventions:
    """How a document becomes tokens: ``[bos] + text tokens + [eos]``."""

    bos_id: Optional[int]
    eos_id: int


def detect_conventions(tokenizer: Any) -> TokenConventions:
    """Prepend BOS only if the tokenizer adds it by default; always append EOS (document separator)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise XltError("tokenizer: it has no EOS token, so packed documents could not be separated")
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    adds_bos = bos is not None and len(ids) > 0 and ids[0] == bos
    return TokenConventions(bos_id=bos if adds_bos else None, eos_id=int(eos))


class DocEncoder:
    """Batch-encode documents with the tokenizer's Rust backend when there is one (fast path)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.conv = detect_conventions(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # encode_batch_fast skips offsets; both give tokenizer(text, add_special_tokens=False) ids.
        self._fast = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
        self._prefix = [self.conv.bos_id] if self.conv.bos_id is not None else []

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        if not texts:
            return []
        if self._fast is not None:
            id_lists = [e.ids for e in self._fast(list(texts), add_special_tokens=False)]
        else:
            id_lists = self.tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
        eos = [self.conv.eos_id]
        # int32 halves the memory of cached documents; rows are int64
        return [np.array(self._prefix + ids + eos, dtype=np.int32) for ids in id_lists]


def subrow_lengths(seq_len: int, warm_len: int) -> list[int]:
    """Sub-row lengths of one row: as many ``warm_len`` as fit, then the rest (a multiple of 8)."""
    warm_len = max(1, min(warm_len, seq_len))
    full, rest = divmod(seq_len, warm_len)
    return [warm_len] * full + ([rest] if rest else [])


class RowBuilder:
    """Fills one row segment by segment; ``space()`` is the room left in the current sub-row."""

    def __init__(self, seq_len: int, warm_len: int):
        self.seq_len = seq_len
        self.ids = np.empty(seq_len, dtype=np.int64)
        self.pos = np.empty(seq_len, dtype=np.int64)
        self._arange = np.arange(seq_len, dtype=np.int64)
        self.starts: list[int] = []
        self.w = 0
        # Ends of the sub-rows, in slots: a segment never crosses one.
        self._bounds = list(np.cumsum(subrow_lengths(seq_len, warm_len)))
        self._b = 0

    def full(self) -> bool:
        return self.w >= self.seq_len

    def space(self) -> int:
        while self._bounds[self._b] <= self.w:
            self._b += 1
        return int(self._bounds[self._b] - self.w)

    def add(self, tokens: np.ndarray) -> None:
        """Append one segment (it must fit ``space()``); its positions restart at 0."""
        n = len(tokens)
        w = self.w
        self.ids[w:w + n] = tokens
        self.pos[w:w + n] = self._arange[:n]
        self.starts.append(w)
        self.w = w + n

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.w != self.seq_len:
            raise RuntimeError(f"row not full: {self.w}/{self.seq_len}")
        labels = self.ids.copy()
        labels[self.starts] = IGNORE_INDEX
        return self.ids, self.pos, labels
