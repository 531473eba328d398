"""The continued-pretraining stream: mixed, packed, curriculum-following and resumable.

The stream is a pure function of (seed, sources, position): every rank computes the same global
sequence of rows and keeps rows ``g % world_size == rank``, so ranks are disjoint and their union
is the single-process stream. A position is a small JSON dict (per-source epoch and cursor, the
half-placed document of each language, the step's quota and the counters), so resuming is O(1):
no batch is replayed. ``state_at(rows)`` returns the state after exactly ``rows`` global rows from
a bounded history, because the DataLoader and accelerate fetch rows ahead of the optimizer.

Use with ``dataloader_num_workers=0`` (tokenisation is batched in Rust; workers would each hold a
copy of the stream and its history), ``use_cache=False`` on the model (with a cache, transformers
does not build the packed mask and documents attend to each other) and no attention mask. On the flash
attention path each process flattens its rows into one varlen row before the forward pass
(xlt/data/collate.py), since transformers builds no per-document mask for flash kernels.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from xlt.config import DataArguments, XltError, validate_data_args
from xlt.data.accounting import Accounting
from xlt.data.clean import Cleaner
from xlt.data.mixture import (
    CACHE_ALL_TOKENS,
    MemoryReader,
    StreamReader,
    pick_language,
    pick_source,
    resolve_weights,
    step_quota,
)
from xlt.data.packing import DocEncoder, RowBuilder
from xlt.data.schedule import cumulative_ja_target, ratio_range, seq_len_at
from xlt.data.sources import LANGS, Source, load_sources

log = logging.getLogger("xlt.data")

STATE_VERSION = 1
LANG_KEY = "xlt_lang"  # per-token language index in each batch; the trainer removes it before the forward pass
SIZE_SAMPLE_DOCS = 256  # documents tokenised to estimate a source's size in tokens


@dataclass
class RowData:
    """One global row with what it is made of (for preview, tests and accounting)."""

    index: int
    input_ids: np.ndarray
    position_ids: np.ndarray
    labels: np.ndarray
    lang_tokens: dict[str, int]
    warm_len: int
    segments: list[tuple[str, dict, int, int]]  # (source, where, offset in document, length)


class PretrainStream(torch.utils.data.IterableDataset):
    """This rank's rows of the global stream: dicts of ``input_ids``, ``position_ids``, ``labels``."""

    def __init__(self, args: DataArguments, sources: list[Source], train_docs: dict[str, list[str]],
                 heldout: dict[str, list[str]], cleaners: dict[str, Cleaner], weights: dict[str, float],
                 encoder: DocEncoder, total_tokens: int, rows_per_step: int, rank: int, world_size: int,
                 history_rows: Optional[int] = None, token_cache: Optional[dict[str, dict]] = None,
                 cache_all: Optional[dict[str, bool]] = None):
        super().__init__()
        self.args, self.sources, self.encoder = args, sources, encoder
        self.seq_len = int(args.seq_len)
        self.total_tokens, self.rows_per_step = int(total_tokens), int(rows_per_step)
        self.rank, self.world_size = int(rank), int(world_size)
        self.weights = weights
        self._train_docs, self._heldout, self._cleaners = train_docs, heldout, cleaners
        self.source_langs = {s.name: s.lang for s in sources}
        self.lang_sources = {lang: [s.name for s in sources if s.lang == lang] for lang in LANGS}
        self.history_rows = history_rows or max(16 * self.rows_per_step, 256)
        self._history: OrderedDict[int, dict] = OrderedDict()
        self._start_state: dict = self._initial_state()
        self._latest: dict = self._start_state
        self.accounting = Accounting(self.source_langs)
        self.warnings: list[str] = []
        self._token_cache: dict[str, dict[int, np.ndarray]] = token_cache or {}  # per source: doc index -> tokens
        self._cache_all: dict[str, bool] = cache_all or {}

    # -- public state API ----------------------------------------------------------------------
    @property
    def cleaning_report(self) -> dict:
        """Dropped-document counts by reason, per source (live for streamed sources)."""
        return {name: c.report() for name, c in self._cleaners.items()}

    def state_dict(self) -> dict:
        """The position after the last row this stream produced (JSON-serialisable)."""
        return self._latest

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` at the next ``iter()``: O(1), nothing is replayed."""
        self._check_state(state)
        self._start_state = state
        self._latest = state
        self._history.clear()
        self._history[int(state["row"])] = state
        self.accounting = Accounting.from_dict(state["accounting"], self.source_langs)

    def state_at(self, rows_consumed: int) -> dict:
        """The state after exactly ``rows_consumed`` global rows (from the bounded history)."""
        rows_consumed = int(rows_consumed)
        if rows_consumed == int(self._start_state["row"]):
            return self._start_state
        state = self._history.get(rows_consumed)
        if state is None:
            have = f"{min(self._history)}..{max(self._history)}" if self._history else "none"
            raise XltError(f"data stream: no state for {rows_consumed} rows consumed (history holds rows {have}); "
                           f"use dataloader_num_workers=0 and a prefetch below {self.history_rows} rows")
        return state

    def accounting_at(self, rows_consumed: int) -> dict:
        """Accounting of exactly the first ``rows_consumed`` global rows."""
        return self.state_at(rows_consumed)["accounting"]

    def heldout_texts(self) -> dict[str, list[str]]:
        """Held-out documents by language (each source's ``holdout`` split, cleaned, deduplicated
        against the training documents). Streamed sources have none."""
        out: dict[str, list[str]] = {lang: [] for lang in LANGS}
        for s in self.sources:
            out[s.lang].extend(self._heldout.get(s.name, []))
        return out

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        if info is not None:
            raise XltError("data stream: PretrainStream must run in the main process (dataloader_num_workers=0)")
        for row in self.global_rows(own_only=True):
            yield {"input_ids": torch.from_numpy(row.input_ids), "position_ids": torch.from_numpy(row.position_ids),
                   "labels": torch.from_numpy(row.labels), LANG_KEY: torch.from_numpy(self.token_langs(row))}

    def token_langs(self, row: RowData) -> np.ndarray:
        """The language of every token of ``row`` as an index into ``LANGS`` (for the loss by language)."""
        codes = [LANGS.index(self.source_langs[name]) for name, _, _, _ in row.segments]
        return np.repeat(np.asarray(codes, dtype=np.int64), [n for _, _, _, n in row.segments])

    def global_rows(self, own_only: bool = False) -> Iterator[RowData]:
        """The global rows from the loaded state on (``own_only``: skip building other ranks' rows)."""
        st = self._start_state
        readers = self._make_readers(st["readers"])
        acc = Accounting.from_dict(st["accounting"], self.source_langs)
        self.accounting = acc
        warned = set(st["warned"])
        g = int(st["row"])
        slots, quota, remaining = dict(st["slots"]), dict(st["quota"]), dict(st["remaining"])
        # A half-placed document per language: [source, tokens, offset, where]
        open_docs: dict[str, Optional[list]] = {lang: None for lang in LANGS}
        for lang, od in st["open"].items():
            if od is not None:
                open_docs[lang] = [od["source"], readers[od["source"]].reopen(od["where"]), int(od["offset"]), od["where"]]
        S, R, args, total = self.seq_len, self.rows_per_step, self.args, self.total_tokens
        lang_sources, weights = self.lang_sources, self.weights
        read_by_source = acc.tokens_read_by_source
        while True:
            if g % R == 0:  # a new optimizer step: its Japanese quota from the schedule's integral
                step_tokens = R * S
                q_ja = step_quota(slots["ja"], cumulative_ja_target((g + R) * S, total, args), step_tokens)
                quota = {"ja": q_ja, "en": step_tokens - q_ja}
                remaining = dict(quota)
            warm = seq_len_at(g * S, total, args)
            build = not own_only or g % self.world_size == self.rank
            rb = RowBuilder(S, warm)
            lang_tokens = {"ja": 0, "en": 0}
            segments = []
            while not rb.full():
                lang = pick_language(remaining, quota)
                doc = open_docs[lang]
                if doc is None:
                    name = pick_source(lang_sources[lang], weights, read_by_source)
                    reader = readers[name]
                    tokens, n_chars, where = reader.next_doc()
                    acc.add_read(name, len(tokens), n_chars)
                    epochs = reader.epochs()
                    acc.epochs_by_source[name] = epochs
                    if epochs > args.max_epochs_warning and name not in warned:
                        warned.add(name)
                        self._warn(f"source {name!r} is now in epoch {int(epochs) + 1} (> {args.max_epochs_warning:g} "
                                   f"passes): repeated data is worth much less (Muennighoff et al. 2023)")
                    doc = open_docs[lang] = [name, tokens, 0, where]
                name, tokens, off, where = doc
                n = min(len(tokens) - off, rb.space(), remaining[lang])
                rb.add(tokens[off:off + n])
                acc.add_trained(name, n, n - 1)
                slots[lang] += n
                remaining[lang] -= n
                lang_tokens[lang] += n
                segments.append((name, where, off, n))
                if off + n >= len(tokens):
                    open_docs[lang] = None
                else:
                    doc[2] = off + n
            ids, pos, labels = rb.finish()
            g += 1
            acc.rows = g
            for name, reader in readers.items():
                acc.epochs_by_source[name] = reader.epochs()
            state = {
                "version": STATE_VERSION, "fingerprint": self._fingerprint(), "row": g, "slots": dict(slots),
                "quota": dict(quota), "remaining": dict(remaining),
                "open": {lang: None if d is None else {"source": d[0], "where": d[3], "offset": d[2]}
                         for lang, d in open_docs.items()},
                "readers": {name: r.state() for name, r in readers.items()},
                "accounting": acc.to_dict(), "warned": sorted(warned),
            }
            self._remember(g, state)
            if build:
                yield RowData(g - 1, ids, pos, labels, lang_tokens, warm, segments)

    # -- internals -----------------------------------------------------------------------------
    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        log.warning(msg)

    def _remember(self, row: int, state: dict) -> None:
        self._latest = state
        self._history[row] = state
        while len(self._history) > self.history_rows:
            self._history.popitem(last=False)

    def _fingerprint(self) -> dict:
        return {"seed": int(self.args.stream_seed), "sources": [s.name for s in self.sources], "seq_len": self.seq_len}

    def _initial_state(self) -> dict:
        return {"version": STATE_VERSION, "fingerprint": self._fingerprint(), "row": 0,
                "slots": {"ja": 0, "en": 0}, "quota": {"ja": 0, "en": 0}, "remaining": {"ja": 0, "en": 0},
                "open": {lang: None for lang in LANGS}, "readers": {s.name: None for s in self.sources},
                "accounting": Accounting(self.source_langs).to_dict(), "warned": []}

    def _check_state(self, state: dict) -> None:
        if isinstance(state, dict) and state.get("kind") == "shards":
            raise XltError("data stream: the checkpoint was written on token shards; resume with data_source: shards")
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise XltError("data stream: the checkpoint's stream state is missing or of another version")
        fp, mine = state.get("fingerprint"), self._fingerprint()
        if fp != mine:
            diff = [k for k in mine if (fp or {}).get(k) != mine[k]]
            raise XltError(f"data stream: the checkpoint was written with other data settings ({', '.join(diff)}); "
                           f"resume with the same stream_seed, sources and seq_len")

    def _make_readers(self, states: dict) -> dict[str, Any]:
        readers: dict[str, Any] = {}
        seed = int(self.args.stream_seed)
        for s in self.sources:
            if s.streaming:
                r: Any = StreamReader(s, self.encoder, seed, self._cleaners[s.name])
            else:
                r = MemoryReader(s.name, self._train_docs[s.name], self.encoder, seed,
                                 self._token_cache.setdefault(s.name, {}), self._cache_all.get(s.name, False))
            if states.get(s.name) is not None:
                r.load(states[s.name])
            readers[s.name] = r
        return readers


# ---------------------------------------------------------------------------------------------
# Construction: checks, cleaning, holdout, weights, repetition forecast
# ---------------------------------------------------------------------------------------------
def check_languages(args: DataArguments, sources: list[Source]) -> None:
    """A language the schedule asks for must have a source."""
    lo, hi = ratio_range(args)
    have = {s.lang for s in sources}
    if hi > 0 and "ja" not in have:
        raise XltError(f"sources: the Japanese ratio reaches {hi:g} but no source has lang: ja")
    if lo < 1 and "en" not in have:
        raise XltError(f"sources: the Japanese ratio goes down to {lo:g}, so English is needed, but no source has lang: en")


def _estimate_tokens(docs: list[str], encoder: DocEncoder) -> tuple[float, dict[int, np.ndarray]]:
    """Tokens of a source, from the token/char ratio of an evenly spaced sample of documents,
    and the sample's tokens (they seed the reader's cache, so nothing is tokenised twice)."""
    step = max(1, len(docs) // SIZE_SAMPLE_DOCS)
    idx = list(range(0, len(docs), step))[:SIZE_SAMPLE_DOCS]
    encoded = dict(zip(idx, encoder.encode([docs[i] for i in idx]), strict=False))
    tokens = sum(len(t) for t in encoded.values())
    if len(idx) == len(docs):
        return float(tokens), encoded
    chars = sum(len(docs[i]) for i in idx)
    return tokens / max(chars, 1) * sum(len(d) for d in docs), encoded


def build_pretrain_stream(data_args: DataArguments, tokenizer: Any, total_tokens: int, rows_per_step: int,
                          rank: int = 0, world_size: int = 1) -> PretrainStream:
    """Check the settings, read and clean the sources, and return this rank's stream."""
    validate_data_args(data_args)
    if total_tokens <= 0:
        raise XltError(f"train tokens must be positive (got {total_tokens})")
    if rows_per_step <= 0 or world_size <= 0 or rows_per_step % world_size:
        raise XltError(f"rows per step ({rows_per_step}) must be a positive multiple of the world size ({world_size})")
    if not 0 <= rank < world_size:
        raise XltError(f"rank {rank} is outside world size {world_size}")
    sources = load_sources(data_args.sources)
    check_languages(data_args, sources)
    encoder = DocEncoder(tokenizer)

    train_docs: dict[str, list[str]] = {}
    heldout: dict[str, list[str]] = {}
    cleaners: dict[str, Cleaner] = {}
    sizes: dict[str, Optional[float]] = {}
    token_cache: dict[str, dict[int, np.ndarray]] = {}
    for s in sources:
        cleaner = cleaners[s.name] = Cleaner(s.lang, data_args)
        if s.streaming:
            sizes[s.name] = None
            continue
        train, held = s.split_holdout()
        train = [t for t in map(cleaner, train) if t is not None]
        if not train:
            rep = cleaner.report()["dropped"]
            why = ", ".join(f"{k}={v}" for k, v in rep.items() if v) or "no documents"
            raise XltError(f"{s.key}: source {s.name!r} is empty after cleaning ({why})")
        held_cleaner = Cleaner(s.lang, data_args)
        held_cleaner.seen = cleaner.seen  # dedup held-out against train: no leakage into evaluation
        held = [t for t in map(held_cleaner, held) if t is not None]
        cleaner.dropped.update(held_cleaner.dropped)  # the report covers the whole source
        cleaner.heldout_kept = held_cleaner.kept
        train_docs[s.name], heldout[s.name] = train, held
        sizes[s.name], token_cache[s.name] = _estimate_tokens(train, encoder)
    weights = resolve_weights(sources, sizes)
    cache_all = {name: bool(size) and size <= CACHE_ALL_TOKENS for name, size in sizes.items()}
    stream = PretrainStream(data_args, sources, train_docs, heldout, cleaners, weights, encoder, total_tokens,
                            rows_per_step, rank, world_size, token_cache=token_cache, cache_all=cache_all)
    # Repetition forecast: tokens each source will supply over the run / its size.
    tokens_run = -(-total_tokens // (rows_per_step * data_args.seq_len)) * rows_per_step * data_args.seq_len
    ja_run = cumulative_ja_target(tokens_run, total_tokens, data_args)
    for s in sources:
        if sizes[s.name]:
            lang_tokens = ja_run if s.lang == "ja" else tokens_run - ja_run
            epochs = lang_tokens * weights[s.name] / sizes[s.name]
            if epochs > data_args.max_epochs_warning:
                stream._warn(f"source {s.name!r} would be seen about {epochs:.1f} times over the run "
                             f"(> {data_args.max_epochs_warning:g}): repeated data is worth much less "
                             f"(Muennighoff et al. 2023); add data or lower its weight")
    return stream
