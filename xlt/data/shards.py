"""Rows of continued pretraining computed by index from prepared token shards (``xlt data prepare``).

Every global row ``g`` is a pure function of ``g`` and the settings, so each rank builds only its own rows
(``g % world_size == rank``, as the in-memory stream assigns them), any number of DataLoader workers may build
them, and resuming at a step is an index: nothing is replayed, no state but the step number.

Layout of a step ``s`` (``R`` rows of ``S`` tokens, ``T = R * S``): the Japanese tokens placed before it are
``J(s) = round(cumulative_ja_target(s * T))`` (the schedule's exact integral, as the stream's step quota), so the
step holds ``J(s + 1) - J(s)`` Japanese tokens and the rest English. Row ``r`` takes
``floor((r + 1) q / R) - floor(r q / R)`` of the step's ``q`` Japanese tokens, then English to ``S``.

Each language is one token stream: blocks of ``seq_len`` tokens dealt to its sources by their weights
(``ROUND`` blocks per round, apportioned by largest remainder and ordered by stride scheduling), and each
source is its kept documents, in a seeded permutation per epoch, one after another. A position in a stream maps
to (source, epoch, document, offset) by arithmetic and one binary search over the epoch's cumulative lengths.
Rows are packed with ``RowBuilder``: a segment never crosses a document (or a warmup sub-row), positions restart
at every segment and its first label is -100, as in the in-memory stream.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from xlt.config import XltError
from xlt.data.mixture import permutation
from xlt.data.packing import RowBuilder
from xlt.data.prepare import KEY_FILE, SUMMARY_FILE, shard_path
from xlt.data.schedule import cumulative_ja_target, seq_len_at
from xlt.data.sources import LANGS
from xlt.data.stream import LANG_KEY

ROUND = 1000  # blocks per round of the weighted deal (weights realised to 1/ROUND)


def ja_tokens_before(step: int, step_tokens: int, total_tokens: int, args: Any) -> int:
    """Japanese tokens the shards' rows place in the steps before ``step``: the schedule's integral, rounded."""
    t = step * step_tokens
    return int(min(max(round(cumulative_ja_target(t, total_tokens, args)), 0), t))


class PreparedData:
    """The kept documents of every source of a prepared folder, memory-mapped (nothing is read up front)."""

    def __init__(self, root: str):
        if not os.path.isfile(os.path.join(root, SUMMARY_FILE)):
            raise XltError(f"{root}: no prepared data ({SUMMARY_FILE} missing); run xlt data prepare")
        with open(os.path.join(root, KEY_FILE), encoding="utf-8") as f:
            self.key = json.load(f)
        with open(os.path.join(root, SUMMARY_FILE), encoding="utf-8") as f:
            self.summary = json.load(f)
        self.langs = {s["name"]: s["lang"] for s in self.key["sources"]}
        self._files: list[np.ndarray] = []
        self.docs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # name -> (file, start, length)
        for name in self.langs:
            self.docs[name] = self._load_source(root, name)

    def _load_source(self, root: str, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        files, starts, lengths = [], [], []
        i = 0
        while os.path.isfile(shard_path(root, name, i) + ".keep.npy"):
            base = shard_path(root, name, i)
            with open(base + ".ds.metadata", encoding="utf-8") as f:
                size = int(f.readline().strip().rsplit("|", 1)[1])
            dtype = np.uint16 if size == 2 else np.uint32
            n_tokens = os.path.getsize(base + ".ds") // size
            self._files.append(np.memmap(base + ".ds", dtype=dtype, mode="r") if n_tokens else np.zeros(0, dtype))
            ends = np.fromfile(base + ".ds.index", dtype=np.uint64).astype(np.int64)
            keep = np.load(base + ".keep.npy")
            begin = np.concatenate([[0], ends[:-1]])
            files.append(np.full(int(keep.sum()), len(self._files) - 1, dtype=np.int32))
            starts.append(begin[keep])
            lengths.append((ends - begin)[keep])
            i += 1
        if not files or not sum(len(x) for x in files):
            raise XltError(f"{root}: source {name!r} has no prepared documents")
        return np.concatenate(files), np.concatenate(starts), np.concatenate(lengths)

    def tokens(self, name: str, doc: int, offset: int, n: int) -> np.ndarray:
        f, start, _ = self.docs[name]
        begin = int(start[doc]) + offset
        return self._files[int(f[doc])][begin:begin + n]


def deal(weights: list[float], blocks: int = ROUND) -> tuple[np.ndarray, np.ndarray]:
    """Blocks per source in one round (largest remainder, at least one each) and the round's order (stride
    scheduling: a source's n-th block at virtual time (n + 0.5) / count, ties by source order)."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    counts = np.maximum(np.floor(w * blocks).astype(np.int64), 1)
    for k in np.argsort(-(w * blocks - np.floor(w * blocks)), kind="stable"):
        if counts.sum() >= blocks:
            break
        counts[k] += 1
    keys = sorted(((n + 0.5) / c, k) for k, c in enumerate(counts) for n in range(c))
    return counts, np.asarray([k for _, k in keys], dtype=np.int64)


@dataclass
class Piece:
    source: str
    doc: int
    offset: int
    length: int


class LanguageStream:
    """One language's token stream over its sources (see the module docstring): position -> pieces."""

    def __init__(self, data: PreparedData, names: list[str], weights: dict[str, float], seed: int, block: int):
        self.data, self.names, self.seed, self.block = data, names, int(seed), int(block)
        self.counts, self.order = deal([weights[n] for n in names])
        # before[k][i]: blocks of source k among the first i blocks of a round
        self.before = np.stack([np.concatenate([[0], np.cumsum(self.order == k)]) for k in range(len(names))])
        self.sizes = {n: int(data.docs[n][2].sum()) for n in names}
        self._epochs: OrderedDict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _epoch(self, name: str, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative lengths in that order) of one epoch of a source; the last 4 are kept."""
        key = (name, epoch)
        if key not in self._epochs:
            lengths = self.data.docs[name][2]
            perm = permutation(self.seed, name, epoch, len(lengths))
            self._epochs[key] = (perm, np.cumsum(lengths[perm]))
            while len(self._epochs) > 4:
                self._epochs.popitem(last=False)
        return self._epochs[key]

    def source_position(self, p: int) -> tuple[int, int, int]:
        """(source index, position in the source's own stream, tokens left in this block) of position ``p``."""
        j, off = divmod(int(p), self.block)
        rounds, i = divmod(j, len(self.order))
        k = int(self.order[i])
        return k, (rounds * int(self.counts[k]) + int(self.before[k][i])) * self.block + off, self.block - off

    def pieces(self, start: int, n: int) -> list[Piece]:
        """Positions ``[start, start + n)`` as pieces, each inside one block and one document."""
        out = []
        while n > 0:
            k, q, left = self.source_position(start)
            name = self.names[k]
            epoch, r = divmod(q, self.sizes[name])
            perm, cum = self._epoch(name, epoch)
            i = int(np.searchsorted(cum, r, side="right"))
            doc_off = r - (int(cum[i - 1]) if i else 0)
            take = min(n, left, int(cum[i]) - r)
            out.append(Piece(name, int(perm[i]), int(doc_off), take))
            start, n = start + take, n - take
        return out

    def tokens_by_source(self, p: int) -> dict[str, int]:
        """Tokens each source supplied to the first ``p`` positions (exact)."""
        j, off = divmod(int(p), self.block)
        rounds, i = divmod(j, len(self.order))
        out = {n: (rounds * int(self.counts[k]) + int(self.before[k][i])) * self.block for k, n in enumerate(self.names)}
        if off:
            out[self.names[int(self.order[i])]] += off
        return out


class ShardRows:
    """Global rows of a run by index (``row(g)``) from prepared shards; see the module docstring."""

    def __init__(self, data: PreparedData, args: Any, total_tokens: int, rows_per_step: int,
                 weights: dict[str, float]):
        self.data, self.args = data, args
        self.seq_len, self.rows_per_step, self.total = int(args.seq_len), int(rows_per_step), int(total_tokens)
        self.step_tokens = self.seq_len * self.rows_per_step
        self.streams = {}
        for lang in LANGS:
            names = [n for n, lg in data.langs.items() if lg == lang]
            if names:
                self.streams[lang] = LanguageStream(data, names, weights, args.stream_seed, self.seq_len)

    def ja_before(self, step: int) -> int:
        return ja_tokens_before(step, self.step_tokens, self.total, self.args)

    def row(self, g: int) -> dict[str, np.ndarray]:
        """Global row ``g``: input_ids, position_ids, labels, the language index of every token."""
        S, R = self.seq_len, self.rows_per_step
        s, r = divmod(int(g), R)
        j0 = self.ja_before(s)
        q = self.ja_before(s + 1) - j0
        ja_start, ja_n = j0 + r * q // R, (r + 1) * q // R - r * q // R
        en_start = s * self.step_tokens - j0 + r * S - r * q // R
        rb = RowBuilder(S, seq_len_at(g * S, self.total, self.args))
        langs = np.empty(S, dtype=np.int64)
        for lang, start, n in (("ja", ja_start, ja_n), ("en", en_start, S - ja_n)):
            if n == 0:
                continue
            if lang not in self.streams:
                raise XltError(f"prepared data: the schedule needs {lang} tokens but no source has lang: {lang}")
            langs[rb.w:rb.w + n] = LANGS.index(lang)
            for piece in self.streams[lang].pieces(start, n):
                done = 0
                while done < piece.length:  # a piece never crosses a warmup sub-row either
                    m = min(piece.length - done, rb.space())
                    rb.add(self.data.tokens(piece.source, piece.doc, piece.offset + done, m))
                    done += m
        ids, pos, labels = rb.finish()
        return {"input_ids": ids, "position_ids": pos, "labels": labels, "langs": langs}

    def accounting(self, steps: int) -> dict[str, Any]:
        """Tokens trained per language and per source after ``steps`` steps (exact, O(sources))."""
        ja = self.ja_before(steps)
        by_lang = {"ja": ja, "en": steps * self.step_tokens - ja}
        by_source: dict[str, int] = {}
        for lang, stream in self.streams.items():
            by_source.update(stream.tokens_by_source(by_lang[lang]))
        return {"tokens_trained": by_lang, "tokens_by_source": by_source}

    def rank_rows(self, step: int, rank: int, world_size: int) -> list[int]:
        """The global rows of ``step`` that ``rank`` builds (``g % world_size == rank``)."""
        R = self.rows_per_step
        if R % world_size:
            raise XltError(f"rows per step ({R}) must be a multiple of the world size ({world_size})")
        return list(range(step * R + rank, (step + 1) * R, world_size))


class ShardDataset(torch.utils.data.Dataset):
    """The run's global rows as a map-style dataset (``len`` = steps x rows per step), read in order.

    The Trainer samples it sequentially (``XltTrainer._get_train_sampler``) and accelerate gives each process its
    own batches of indices (no dispatch: a map-style dataset's batches are never sent from process 0), so a rank
    builds only its rows. On resume the Trainer skips the consumed batches by index (nothing is read for them).
    ``tokens_read`` counts the tokens this rank built, in this process and in its ``workers`` DataLoader workers."""

    index_resume = True  # the Trainer skips consumed batches by index (build_cpt_trainer)

    def __init__(self, rows: ShardRows, max_steps: int, prepared_dir: str, workers: int = 0):
        self.rows, self.max_steps, self.prepared_dir = rows, int(max_steps), prepared_dir
        # Tokens built: slot 0 by this process, slot 1 + i by DataLoader worker i. In shared memory, so the
        # workers' counts (forked or spawned copies of this dataset) are seen here; one writer per slot.
        self._read = torch.zeros(1 + int(workers), dtype=torch.int64).share_memory_()
        key = json.dumps(rows.data.key, sort_keys=True).encode("utf-8")
        self.fingerprint = {"data": hashlib.sha256(key).hexdigest(), "seed": int(rows.args.stream_seed),
                            "seq_len": rows.seq_len, "rows_per_step": rows.rows_per_step, "total_tokens": rows.total}

    def __len__(self) -> int:
        return self.max_steps * self.rows.rows_per_step

    @property
    def tokens_read(self) -> int:
        return int(self._read.sum())

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        row = self.rows.row(int(g))
        worker = torch.utils.data.get_worker_info()
        slot = 0 if worker is None else 1 + worker.id
        if slot >= len(self._read):
            raise XltError(f"data: DataLoader worker {worker.id} of a dataset built for {len(self._read) - 1} workers")
        self._read[slot] += len(row["input_ids"])
        return {"input_ids": torch.from_numpy(row["input_ids"]), "position_ids": torch.from_numpy(row["position_ids"]),
                "labels": torch.from_numpy(row["labels"]), LANG_KEY: torch.from_numpy(row["langs"])}

    @property
    def cleaning_report(self) -> dict:
        s = self.rows.data.summary
        return {name: {"kept": s["documents"][name], "dropped": s["dropped"][name]} for name in s["documents"]}

    def state_at(self, rows_consumed: int) -> dict:
        return {"version": 1, "kind": "shards", "row": int(rows_consumed), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint of this data: the position is the step (the Trainer skips by index); other data refused."""
        if not isinstance(state, dict) or state.get("kind") != "shards":
            raise XltError("data: the checkpoint was written by the in-memory stream; resume with data_source: stream")
        if state.get("fingerprint") != self.fingerprint:
            diff = [k for k in self.fingerprint if (state.get("fingerprint") or {}).get(k) != self.fingerprint[k]]
            raise XltError(f"data: the checkpoint was written with other prepared data or settings ({', '.join(diff)})")

    def accounting_at(self, rows_consumed: int) -> dict:
        """Tokens trained (per language, per source), the schedule's target and the share after ``rows_consumed``."""
        steps = int(rows_consumed) // self.rows.rows_per_step
        acc = self.rows.accounting(steps)
        total = steps * self.rows.step_tokens
        ja_target = round(cumulative_ja_target(total, self.rows.total, self.rows.args))
        acc.update({"rows": int(rows_consumed), "target_tokens": {"ja": ja_target, "en": total - ja_target},
                    "ja_share_trained": acc["tokens_trained"]["ja"] / total if total else 0.0})
        return acc


def build_shard_dataset(sources: list[Any], data_args: Any, tokenizer: Any, tokenizer_dir: str, prepared_dir: str,
                        total_tokens: int, rows_per_step: int, max_steps: int, build: bool = True,
                        trust_remote_code: bool = False, log: Any = print, workers: int = 0) -> ShardDataset:
    """The shards in ``prepared_dir``, prepared first when missing (by the main process, ``build``; the others
    wait for them without a collective), refused when prepared with other settings."""
    from xlt.data.mixture import resolve_weights
    from xlt.data.prepare import SHARD_BYTES, is_prepared, prepare_data, settings_key
    from xlt.io import wait_for

    key = settings_key(sources, data_args, tokenizer, SHARD_BYTES)
    if build and not is_prepared(prepared_dir, key):
        log(f"data: preparing token shards in {prepared_dir} (xlt data prepare, 1 process)")
        summary = prepare_data(sources, data_args, tokenizer, tokenizer_dir, prepared_dir,
                               trust_remote_code=trust_remote_code)
        log(f"data: {summary['shards']} shards, {sum(summary['tokens'].values()):,} tokens in {summary['seconds']:.1f}s")
    elif not build:
        wait_for(lambda: is_prepared(prepared_dir, key), f"token shards in {prepared_dir}", log=log)
    else:
        log(f"data: reusing the token shards in {prepared_dir} (same settings)")
    data = PreparedData(prepared_dir)
    weights = resolve_weights(sources, {s.name: float(data.summary["tokens"][s.name]) for s in sources})
    return ShardDataset(ShardRows(data, data_args, total_tokens, rows_per_step, weights), max_steps, prepared_dir,
                        workers=workers)
