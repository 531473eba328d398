"""The mixture: which language and which source the next document piece comes from.

HF's ``interleave_datasets`` (and every mixer in LLaMA-Factory, axolotl, TRL) draws from fixed
probabilities: the share can neither change during training nor is it exact. Here the
Japanese share is realised deterministically at token level:

* each optimizer step of ``T`` tokens gets a Japanese quota
  ``round(cumulative_target(end of step)) - Japanese tokens so far``, so after every step the
  cumulative Japanese count is within half a token of the integral of the schedule, and each
  step's own share is the schedule's mean over that step;
* inside a step, the next piece comes from the language furthest behind its own quota (so rows
  mix languages), and a piece never exceeds what its language still may place in the step;
* inside a language, the next document comes from the source furthest below its weighted share
  of the tokens read (smooth weighted round-robin: exact, no randomness).

Repetition: a source that runs out starts a new epoch with a fresh shuffle (seeded by
``(seed, source name, epoch)``), and the epochs are counted.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np

from xlt.config import XltError
from xlt.data.packing import DocEncoder
from xlt.data.sources import LANGS, Source

log = logging.getLogger("xlt.data")

LOOKAHEAD_DOCS = 256  # documents tokenised per batch call (one Rust call, both cores)
CACHE_ALL_TOKENS = 50_000_000  # in-memory sources up to this size keep their tokens (int32) for all epochs


# ---------------------------------------------------------------------------------------------
# Pure decisions
# ---------------------------------------------------------------------------------------------
def step_quota(ja_so_far: int, target_at_step_end: float, step_tokens: int) -> int:
    """Japanese tokens the coming step must hold so the cumulative count meets the target."""
    return int(min(max(round(target_at_step_end) - ja_so_far, 0), step_tokens))


def pick_language(remaining: dict[str, int], quota: dict[str, int]) -> str:
    """The language with the largest share of its step quota still to place (ties: 'ja')."""
    ja_r, en_r = remaining["ja"], remaining["en"]
    if en_r <= 0:
        return "ja"
    if ja_r <= 0:
        return "en"
    # ja_r / ja_q >= en_r / en_q, in integers
    return "ja" if ja_r * quota["en"] >= en_r * quota["ja"] else "en"


def pick_source(names: list[str], weights: dict[str, float], read: dict[str, int]) -> str:
    """Smooth weighted round-robin over tokens read: the source furthest below its share."""
    total = sum(read[n] for n in names)
    return max(names, key=lambda n: (weights[n] * total - read[n], -names.index(n)))


def resolve_weights(sources: list[Source], sizes: dict[str, Optional[float]]) -> dict[str, float]:
    """Normalised weights within each language.

    Given weights are used as relative numbers. When no source of a language has a weight and
    all their sizes (estimated tokens) are known, weights are proportional to size, so every
    source advances through its epochs at the same pace; otherwise missing weights are 1.
    """
    out: dict[str, float] = {}
    for lang in LANGS:
        group = [s for s in sources if s.lang == lang]
        if not group:
            continue
        if all(s.weight is None for s in group) and all(sizes.get(s.name) for s in group):
            raw = {s.name: float(sizes[s.name]) for s in group}
        else:
            raw = {s.name: float(s.weight) if s.weight is not None else 1.0 for s in group}
        total = sum(raw.values())
        out.update({n: w / total for n, w in raw.items()})
    return out


def permutation(seed: int, name: str, epoch: int, n: int) -> np.ndarray:
    """The order of a source's documents in one epoch: a pure function of (seed, name, epoch)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode("utf-8")), int(epoch)])
    return rng.permutation(n)


# ---------------------------------------------------------------------------------------------
# Readers: a source's documents in epoch order, as token arrays
# ---------------------------------------------------------------------------------------------
class MemoryReader:
    """An in-memory source (local files, embedded corpora). Position = (epoch, cursor).

    ``cache`` maps document index -> tokens and is shared by every reader of the source (it
    survives resumes and re-iteration). With ``cache_all`` each document is tokenised once for
    all epochs; otherwise only the pre-seeded entries (the size-estimation sample) are kept.
    """

    streaming = False

    def __init__(self, name: str, docs: list[str], encoder: DocEncoder, seed: int,
                 cache: Optional[dict[int, np.ndarray]] = None, cache_all: bool = False):
        if not docs:
            raise XltError(f"source {name!r} has no training documents")
        self.name, self.docs, self.encoder, self.seed = name, docs, encoder, seed
        self.cache = cache if cache is not None else {}
        self.cache_all = cache_all
        self.epoch, self.cursor = 0, 0
        self._perm = permutation(seed, name, 0, len(docs))
        self._buf: list[np.ndarray] = []
        self._buf_start = 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._perm = permutation(self.seed, self.name, self.epoch, len(self.docs))
        self._buf, self._buf_start = [], self.cursor

    def epochs(self) -> float:
        return self.epoch + self.cursor / len(self.docs)

    def _tokens(self, indices: np.ndarray) -> list[np.ndarray]:
        """Tokens of documents by index: one batched encoder call for those not cached."""
        cache = self.cache
        missing = [int(j) for j in indices if int(j) not in cache]
        fresh = dict(zip(missing, self.encoder.encode([self.docs[j] for j in missing]), strict=False))
        if self.cache_all:
            cache.update(fresh)
        return [cache[j] if j in cache else fresh[j] for j in map(int, indices)]

    def next_doc(self) -> tuple[np.ndarray, int, dict]:
        """(tokens, characters, cursor to reopen it) of the next document; a new epoch reshuffles."""
        if self.cursor >= len(self.docs):
            self.epoch += 1
            self.cursor = 0
            self._perm = permutation(self.seed, self.name, self.epoch, len(self.docs))
            self._buf, self._buf_start = [], 0
        i = self.cursor - self._buf_start
        if i >= len(self._buf) or i < 0:
            self._buf = self._tokens(self._perm[self.cursor:self.cursor + LOOKAHEAD_DOCS])
            self._buf_start, i = self.cursor, 0
        text_len = len(self.docs[self._perm[self.cursor]])
        where = {"epoch": self.epoch, "index": self.cursor}
        self.cursor += 1
        return self._buf[i], text_len, where

    def reopen(self, where: dict) -> np.ndarray:
        """Tokens of an earlier document (to restore a half-placed document on resume)."""
        perm = permutation(self.seed, self.name, int(where["epoch"]), len(self.docs))
        return self._tokens(perm[int(where["index"]):int(where["index"]) + 1])[0]


class StreamReader:
    """A streamed hub dataset (``datasets.IterableDataset``), resumable through its state_dict.

    Position = (epoch, snapshot of the dataset state before the current batch, documents taken
    from that batch). Resuming loads the snapshot and skips at most one batch: O(1) in the
    stream length. Caveat from ``datasets``: a shuffled stream restores its position but not the
    content of its shuffle buffer, so the documents right after a resume can differ from an
    uninterrupted run. The dedup set of the cleaner restarts empty after a resume.
    """

    streaming = True
    BATCH = 64

    def __init__(self, source: Source, encoder: DocEncoder, seed: int, cleaner: Any):
        self.source, self.name, self.encoder, self.seed, self.cleaner = source, source.name, encoder, seed, cleaner
        cleaner.seen.clear()  # a new iteration of the stream dedups from scratch, as the first one did
        self.epoch, self.taken, self.docs_in_epoch = 0, 0, 0
        self.snapshot: Optional[dict] = None
        self._ds = None
        self._it: Optional[Iterator] = None
        self._batch: list[tuple[np.ndarray, str]] = []
        self._known_len: Optional[int] = None

    def _open(self) -> None:
        ds = self.source.open_hub_dataset().shuffle(seed=self.seed, buffer_size=10_000)
        ds.set_epoch(self.epoch)
        if self.snapshot is not None:
            ds.load_state_dict(self.snapshot)
        self._ds, self._it = ds, iter(ds)

    def state(self) -> dict:
        return {"epoch": self.epoch, "snapshot": self.snapshot, "taken": self.taken,
                "docs_in_epoch": self.docs_in_epoch, "known_len": self._known_len}

    def load(self, state: dict) -> None:
        self.epoch, self.snapshot, self.docs_in_epoch = int(state["epoch"]), state["snapshot"], int(state["docs_in_epoch"])
        self._known_len = state.get("known_len")
        skip = int(state["taken"])
        self._ds = self._it = None
        self._batch, self.taken = [], 0
        if self.snapshot is not None or skip:
            self._fill()
            self._batch, self.taken = self._batch[skip:], skip

    def epochs(self) -> float:
        if self._known_len:
            return self.epoch + self.docs_in_epoch / self._known_len
        return float(self.epoch)

    def _fill(self) -> None:
        """Read the next batch of cleaned documents; an exhausted stream starts the next epoch."""
        if self._it is None:
            self._open()
        self.snapshot = self._ds.state_dict()
        texts: list[str] = []
        restarted = False
        while len(texts) < self.BATCH:
            try:
                row = next(self._it)
            except StopIteration:
                if texts or restarted:
                    break
                # A new epoch: set_epoch reshuffles the shards and the buffer.
                self._known_len = self.docs_in_epoch
                self.epoch += 1
                self.docs_in_epoch = 0
                self.cleaner.seen.clear()
                self.snapshot = None
                self._open()
                self.snapshot = self._ds.state_dict()
                restarted = True
                continue
            text = row.get(self.source.text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise XltError(f"{self.source.key}: a row of {self.source.dataset!r} has no text field "
                               f"{self.source.text_field!r}")
            cleaned = self.cleaner(text)
            if cleaned is not None:
                texts.append(cleaned)
        if not texts:
            raise XltError(f"{self.source.key}: source {self.name!r} yields no document (empty or all cleaned away)")
        self._batch = list(zip(self.encoder.encode(texts), texts, strict=False))
        self.taken = 0

    def next_doc(self) -> tuple[np.ndarray, int, dict]:
        if self.taken >= len(self._batch):
            self._fill()
        tokens, text = self._batch[self.taken]
        self.taken += 1
        self.docs_in_epoch += 1
        # A streamed document cannot be reopened by index: its text travels in the state.
        return tokens, len(text), {"epoch": self.epoch, "text": text}

    def reopen(self, where: dict) -> np.ndarray:
        return self.encoder.encode([where["text"]])[0]
