"""``xlt data prepare``: tokenize a cpt recipe's sources once, in parallel, into memory-mapped token shards.

The pipeline runs on datatrove's executors (local: N processes on one machine; ``SlurmPipelineExecutor`` for a
cluster, see README) in two stages:

1. ``tokenize`` (one datatrove task per shard): read a slice of one source (the training part: held-out documents
   never enter the shards), clean it with xlt's ``Cleaner`` (NFKC, too short, low Japanese share; no dedup here),
   tokenize with the run's tokenizer in xlt's conventions (``DocEncoder``: BOS only when the tokenizer adds one,
   EOS after every document) and write datatrove's token file layout through its ``TokenizedFile``:
   ``NNNNN.ds`` (uint16 or uint32 tokens), ``NNNNN.ds.index`` (uint64 document ends), ``NNNNN.ds.metadata``;
   beside it xlt's ``NNNNN.hashes.npy`` (16-byte BLAKE2b of every cleaned document) and ``NNNNN.stats.json``.
2. ``dedup`` (one task): exact deduplication across all sources from the hashes (first occurrence in recipe,
   shard, document order is kept; ``np.unique`` over fixed-size digests, no Python set), written as
   ``NNNNN.keep.npy`` per shard, and the summary ``prepared.json``. Duplicates stay in the token files and are
   skipped by readers, so the dedup decision persists with the shards and training holds no dedup set.

datatrove's ``ExactDedup*`` stages hash and sort documents of one pipeline through its own text normalisation;
xlt keeps its own cleaning and BLAKE2b digests (the same ones the in-memory stream uses), so that step is ours.

Each datatrove task marks its completion in ``logs/<stage>/completions``: a killed prepare reruns only the
unfinished tasks, which rewrite their files under the same names (no duplicate shards). The output folder is
keyed by its settings in ``xlt_data_key.json``: the same settings reuse it, other settings are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any

import numpy as np

from xlt import validate
from xlt.config import XltError
from xlt.data.clean import REASONS, Cleaner, doc_hash
from xlt.io import atomic_write_json

PREPARE_VERSION = 1
SHARD_BYTES = 64 * 2**20  # input bytes (UTF-8) per shard of a local source
ENCODE_BATCH = 1000
KEY_FILE = "xlt_data_key.json"
SUMMARY_FILE = "prepared.json"


def prepared_dir_of(data_args: Any, output_dir: str) -> str:
    """Where a run's token shards live: ``prepared_dir``, else ``OUTPUT_DIR/data``."""
    return data_args.prepared_dir or os.path.join(output_dir, "data")


# ---------------------------------------------------------------------------------------------
# Plan: sources -> shards (fixed by the settings, never by the number of processes)
# ---------------------------------------------------------------------------------------------
def source_bytes(source: Any) -> int:
    if source.path is not None:
        return sum(os.path.getsize(f) for f in source.files())
    return sum(len(d.encode("utf-8")) for d in source.all_documents())


def plan_shards(sources: list[Any], shard_bytes: int = SHARD_BYTES) -> list[tuple[str, int, int]]:
    """One ``(source name, shard index, shards of the source)`` per datatrove task, in recipe order: a local source
    in pieces of ``shard_bytes``, a hub dataset (streamed) one task per file (``IterableDataset.num_shards``)."""
    tasks = []
    for s in sources:
        n = s.open_hub_dataset().num_shards if s.streaming else max(1, math.ceil(source_bytes(s) / shard_bytes))
        tasks.extend((s.name, i, n) for i in range(n))
    return tasks


def shard_path(root: str, source: str, index: int) -> str:
    return os.path.join(root, "shards", source, f"{index:05d}")


def settings_key(sources: list[Any], data_args: Any, tokenizer: Any, shard_bytes: int) -> dict:
    """What the shards depend on: sources, cleaning, the tokenizer's vocabulary and conventions, the sharding (not
    the model: models that share a tokenizer share the shards)."""
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8")).hexdigest()
    from xlt.data.packing import detect_conventions

    conv = detect_conventions(tokenizer)
    spec_keys = ("name", "lang", "embedded", "path", "dataset", "config", "split", "revision", "text_field",
                 "max_docs", "holdout")
    return {"version": PREPARE_VERSION, "vocab_sha256": vocab, "bos_id": conv.bos_id,
            "eos_id": conv.eos_id, "sources": [{k: getattr(s, k) for k in spec_keys} for s in sources],
            "clean": {k: getattr(data_args, k) for k in ("clean_nfkc", "clean_min_chars", "clean_min_ja_share",
                                                         "clean_dedup")},
            "shard_bytes": shard_bytes}


def check_writable(out: str) -> None:
    """``out`` can be written (``xlt.validate.check_output_dir``'s probe), then created."""
    validate.check_output_dir(out, "--output_dir")
    os.makedirs(out, exist_ok=True)


def check_output_dir(out: str, key: dict) -> bool:
    """Writable and, when it holds prepared data, of these settings (True: a previous prepare's key matches)."""
    check_writable(out)
    path = os.path.join(out, KEY_FILE)
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        have = json.load(f)
    if have != key:
        diff = sorted(k for k in set(have) | set(key) if have.get(k) != key.get(k))
        raise XltError(f"--output_dir: {out} holds data prepared with other settings ({', '.join(diff)}); "
                       f"use another --output_dir or delete it")
    return True


# ---------------------------------------------------------------------------------------------
# Stage 1: read, clean, tokenize, write (one datatrove task per shard)
# ---------------------------------------------------------------------------------------------
def shard_documents(source: Any, index: int, n: int):
    """The training documents of one shard: a contiguous slice of a local source's training part, or file
    ``index`` of the ``n`` of a streamed hub dataset (``IterableDataset.shard``)."""
    if source.streaming:
        from xlt.data.sources import text_of

        for row in source.open_hub_dataset().shard(num_shards=n, index=index):
            yield text_of(row, source.text_field, source.key, source.dataset)
        return
    train = source.split_holdout()[0]
    yield from train[len(train) * index // n: len(train) * (index + 1) // n]


_TOKENIZERS: dict[str, Any] = {}  # per process: tasks run one after another in a worker reuse the tokenizer


def _tokenizer(path: str, trust_remote_code: bool) -> Any:
    from xlt.models import load_tokenizer

    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = load_tokenizer(path, trust_remote_code=trust_remote_code)
    return _TOKENIZERS[path]


class TokenizeShards:
    """The datatrove pipeline step of stage 1 (picklable: the tokenizer is loaded in the task's process)."""

    def __init__(self, root: str, sources: list[Any], tasks: list[tuple[str, int, int]], tokenizer_dir: str,
                 data_args: Any, trust_remote_code: bool = False):
        self.root, self.tasks, self.tokenizer_dir = root, tasks, tokenizer_dir
        self.sources = {s.name: s for s in sources}
        self.data_args, self.trust_remote_code = data_args, trust_remote_code

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> Any:
        from datatrove.pipeline.tokens.tokenizer import TokenizedFile

        from xlt.data.packing import DocEncoder

        name, index, n = self.tasks[rank]
        source = self.sources[name]
        encoder = DocEncoder(_tokenizer(self.tokenizer_dir, self.trust_remote_code))
        base = shard_path(self.root, name, index)
        os.makedirs(os.path.dirname(base), exist_ok=True)
        token_size = 2 if len(encoder.tokenizer) <= 2**16 else 4
        out = TokenizedFile(os.path.dirname(base), os.path.basename(base) + ".ds", save_final_metadata=True,
                            token_size=token_size, tokenizer_name_or_path=self.tokenizer_dir)
        cleaner = Cleaner(source.lang, self.data_args)
        cleaner.dedup = False  # exact dedup runs across all sources in stage 2
        hashes, chars, batch = [], 0, []

        def flush() -> None:
            for ids in encoder.encode(batch):
                out.write_bytes(ids.astype(np.uint16 if token_size == 2 else np.uint32).tobytes())
            batch.clear()

        for text in shard_documents(source, index, n):
            chars += len(text)
            kept = cleaner(text)
            if kept is None:
                continue
            hashes.append(np.frombuffer(doc_hash(kept), dtype=np.uint64))
            batch.append(kept)
            if len(batch) >= ENCODE_BATCH:
                flush()
        flush()
        out.close()
        np.save(base + ".hashes.npy", np.asarray(hashes, dtype=np.uint64).reshape(-1, 2))
        atomic_write_json(base + ".stats.json", {"chars": chars, "documents": cleaner.kept,
                                                 "tokens": int(out.write_idx),
                                                 "dropped": {r: int(cleaner.dropped.get(r, 0)) for r in REASONS}})
        return data


# ---------------------------------------------------------------------------------------------
# Stage 2: exact dedup across sources from the digests, summary
# ---------------------------------------------------------------------------------------------
class DedupShards:
    """The datatrove pipeline step of stage 2 (one task): ``NNNNN.keep.npy`` per shard and ``prepared.json``."""

    def __init__(self, root: str, tasks: list[tuple[str, int, int]], dedup: bool):
        self.root, self.tasks, self.dedup = root, tasks, dedup

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> Any:
        hashes = [np.load(shard_path(self.root, name, i) + ".hashes.npy") for name, i, _ in self.tasks]
        sizes = [len(h) for h in hashes]
        keep = np.ones(sum(sizes), dtype=bool)
        if self.dedup and keep.size:
            _, first = np.unique(np.concatenate(hashes), axis=0, return_index=True)  # first occurrence of each
            keep[:] = False
            keep[first] = True
        summary: dict[str, Any] = {"documents": {}, "tokens": {}, "dropped": {}, "chars": {}, "shards": len(self.tasks)}
        start = 0
        for (name, i, _), n in zip(self.tasks, sizes):
            base = shard_path(self.root, name, i)
            mask = keep[start:start + n]
            start += n
            np.save(base + ".keep.npy", mask)
            with open(base + ".stats.json", encoding="utf-8") as f:
                stats = json.load(f)
            ends = np.fromfile(base + ".ds.index", dtype=np.uint64).astype(np.int64)
            lengths = np.diff(np.concatenate([[0], ends]))
            dropped = summary["dropped"].setdefault(name, {r: 0 for r in REASONS})
            for r, v in stats["dropped"].items():
                dropped[r] += v
            dropped["duplicate"] += int(n - mask.sum())
            summary["documents"][name] = summary["documents"].get(name, 0) + int(mask.sum())
            summary["tokens"][name] = summary["tokens"].get(name, 0) + int(lengths[mask].sum())
            summary["chars"][name] = summary["chars"].get(name, 0) + int(stats["chars"])
        atomic_write_json(os.path.join(self.root, SUMMARY_FILE), summary)
        return data


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def executors(root: str, sources: list[Any], tasks: list[tuple[str, int, int]], tokenizer_dir: str, data_args: Any,
              processes: int, trust_remote_code: bool = False) -> Any:
    """The two datatrove local executors (the dedup one depends on the tokenize one)."""
    from datatrove.executor import LocalPipelineExecutor

    # fork: the workers inherit the imported modules and the loaded tokenizer (forkserver would re-import
    # transformers and reload the tokenizer in every worker, seconds each); they only tokenize and write files.
    tok = LocalPipelineExecutor([TokenizeShards(root, sources, tasks, tokenizer_dir, data_args, trust_remote_code)],
                                tasks=len(tasks), workers=min(processes, len(tasks)), start_method="fork",
                                logging_dir=os.path.join(root, "logs", "tokenize"))
    return LocalPipelineExecutor([DedupShards(root, tasks, bool(data_args.clean_dedup))], tasks=1, workers=1,
                                 logging_dir=os.path.join(root, "logs", "dedup"), depends=tok)


def prepare_data(sources: list[Any], data_args: Any, tokenizer: Any, tokenizer_dir: str, out: str,
                 processes: int = 1, shard_bytes: int = SHARD_BYTES, trust_remote_code: bool = False) -> dict:
    """Prepare (or reuse, or finish) the token shards of ``sources`` in ``out``; returns the ``--json`` summary."""
    if processes < 1:
        raise XltError(f"--processes must be at least 1 (got {processes})")
    t0 = time.time()
    key = settings_key(sources, data_args, tokenizer, shard_bytes)
    check_output_dir(out, key)
    atomic_write_json(os.path.join(out, KEY_FILE), key)
    tasks = plan_shards(sources, shard_bytes)
    _TOKENIZERS.setdefault(tokenizer_dir, tokenizer)  # the tasks (and forked workers) use this one
    executors(out, sources, tasks, tokenizer_dir, data_args, processes, trust_remote_code).run()
    with open(os.path.join(out, SUMMARY_FILE), encoding="utf-8") as f:
        summary = json.load(f)
    return {"documents": summary["documents"], "tokens": summary["tokens"], "dropped": summary["dropped"],
            "shards": summary["shards"], "seconds": round(time.time() - t0, 3)}


def is_prepared(out: str, key: dict) -> bool:
    """``out`` holds complete shards of exactly these settings."""
    return os.path.isfile(os.path.join(out, SUMMARY_FILE)) and check_output_dir(out, key)
