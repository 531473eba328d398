"""Document sources: hub datasets (streamed), local files and the embedded corpora.

A source spec is a mapping from a recipe, e.g.::

    {name: wiki, lang: ja, dataset: wikimedia/wikipedia, config: 20231101.ja, split: train}
    {name: notes, lang: ja, path: "data/*.jsonl", text_field: body}
    {name: hironsan, lang: ja, embedded: hironsan}

``load_sources`` checks every spec (keys, files, the text field in the first row) and raises an
``XltError`` naming the key and the file before any model is loaded.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

from xlt.config import XltError
from xlt.validate import AT_LEAST_1, HEAD_BYTES, check_spec, decode_line, decode_text, read_text_head

LANGS = ("ja", "en")
# The fields of a source spec and their types (None, i.e. absent, is allowed for each).
_SPEC_TYPES: dict[str, type] = {"name": str, "lang": str, "domain": str, "embedded": str, "path": str,
                                "dataset": str, "config": str, "split": str, "text_field": str, "weight": float,
                                "max_docs": int, "holdout": float, "revision": str}
_SPEC_KEYS = set(_SPEC_TYPES)


@dataclass
class Source:
    """A named stream of documents in one language."""

    name: str
    lang: str
    domain: str = "general"
    embedded: Optional[str] = None
    path: Optional[str] = None
    dataset: Optional[str] = None
    config: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    text_field: str = "text"
    weight: Optional[float] = None
    max_docs: Optional[int] = None
    holdout: float = 0.0
    key: str = "sources"  # where the spec came from, for error messages
    _cache: Optional[list[str]] = field(default=None, repr=False, compare=False)

    @property
    def streaming(self) -> bool:
        """Hub datasets are streamed; local and embedded sources are read into memory."""
        return self.dataset is not None

    def files(self) -> list[str]:
        files = sorted(glob.glob(os.path.expanduser(self.path))) if self.path else []
        return files

    def validate(self) -> None:
        """Cheap checks: files exist and the first record has the text field."""
        if self.embedded is not None:
            from xlt.embedded import EMBEDDED_CORPORA

            if self.embedded not in EMBEDDED_CORPORA:
                raise XltError(f"{self.key}: unknown embedded corpus {self.embedded!r} "
                               f"(choose from {', '.join(sorted(EMBEDDED_CORPORA))})")
        elif self.path is not None:
            files = self.files()
            if not files:
                raise XltError(f"{self.key}: data file not found: {self.path}")
            for f in files:
                _check_text_field(f, self.text_field, self.key)
        elif self.dataset is not None:
            if os.path.isdir(self.dataset) or os.path.isfile(self.dataset):
                return  # a local dataset directory: checked when opened
            # Hub ids are checked lazily: the hub may be unreachable here, and streaming opens fast.

    def all_documents(self) -> list[str]:
        """Every document of a non-streaming source, in file order (cached)."""
        if self.streaming:
            raise XltError(f"{self.key}: hub source {self.name!r} is streamed; it has no document list")
        if self._cache is None:
            if self.embedded is not None:
                from xlt.embedded import embedded_documents

                docs = embedded_documents(self.embedded)
            else:
                docs = []
                for f in self.files():
                    docs.extend(read_documents(f, self.text_field, key=self.key))
            if self.max_docs is not None:
                docs = docs[: self.max_docs]
            self._cache = docs
        return self._cache

    def split_holdout(self) -> tuple[list[str], list[str]]:
        """(train, held-out) documents: a deterministic split, every k-th document held out.

        A held-out document that also occurs in the training part (corpora repeat lines) is
        dropped from the held-out part, so evaluation never scores text the model trained on.
        """
        docs = self.all_documents()
        if self.holdout <= 0:
            return docs, []
        # Document i is held out when floor((i + 1) * h) steps up: exactly a fraction h, evenly spread.
        h = self.holdout
        is_held = [int((i + 1) * h) > int(i * h) for i in range(len(docs))]
        train = [d for d, held in zip(docs, is_held) if not held]
        seen = set(train)
        held = [d for d, held in zip(docs, is_held) if held and d not in seen]
        return train, held

    def iter_stream(self, seed: int = 0, epoch: int = 0) -> Iterator[str]:
        """A streamed hub dataset's documents for one epoch (shuffled by seed + epoch)."""
        ds = self.open_hub_dataset()
        ds = ds.shuffle(seed=seed, buffer_size=10_000)
        ds.set_epoch(epoch)
        for row in ds:
            yield text_of(row, self.text_field, self.key, self.dataset)

    def open_hub_dataset(self):
        """The ``datasets.IterableDataset`` of a hub source (streaming=True)."""
        import datasets

        try:
            ds = datasets.load_dataset(self.dataset, self.config, split=self.split, streaming=True,
                                       revision=self.revision)
        except Exception as e:  # noqa: BLE001 - re-raised with the key that named it
            raise XltError(f"{self.key}: cannot open dataset {self.dataset!r}: {str(e).splitlines()[0]}") from None
        if ds.column_names is not None and self.text_field not in ds.column_names:
            raise XltError(f"{self.key}: dataset {self.dataset!r} has no field {self.text_field!r} "
                           f"(fields: {', '.join(ds.column_names)})")
        return ds



def _json_line(line: str, path: str, lineno: int):
    """One JSON Lines row; a parse error is one line naming the file and line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise XltError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None

def load_sources(specs: Optional[list[dict]], key: str = "sources") -> list[Source]:
    """Build and validate sources from recipe specs; errors name ``key[i]`` and the problem."""
    if not specs:
        raise XltError(f"{key}: no data source given")
    if not isinstance(specs, list):
        raise XltError(f"{key}: expected a list of source mappings")
    sources, names = [], set()
    for i, spec in enumerate(specs):
        where = f"{key}[{i}]"
        if not isinstance(spec, dict):
            raise XltError(f"{where}: expected a mapping, got {spec!r}")
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise XltError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        check_spec(where, spec, _SPEC_TYPES, {"max_docs": AT_LEAST_1})
        kinds = [k for k in ("embedded", "path", "dataset") if spec.get(k) is not None]
        if len(kinds) != 1:
            raise XltError(f"{where}: give exactly one of embedded, path or dataset")
        lang = spec.get("lang")
        if lang not in LANGS:
            raise XltError(f"{where}: lang must be one of {', '.join(LANGS)} (got {lang!r})")
        name = spec.get("name") or str(spec[kinds[0]])
        if name in names:
            raise XltError(f"{where}: duplicate source name {name!r}")
        names.add(name)
        weight = spec.get("weight")
        if weight is not None and not float(weight) > 0:
            raise XltError(f"{where}: weight must be > 0 (got {weight})")
        holdout = float(spec.get("holdout", 0.0))
        if not 0.0 <= holdout < 1.0:
            raise XltError(f"{where}: holdout must be in [0, 1) (got {holdout})")
        src = Source(name=name, lang=lang, domain=spec.get("domain", "general"), embedded=spec.get("embedded"),
                     path=spec.get("path"), dataset=spec.get("dataset"), config=spec.get("config"),
                     split=spec.get("split", "train"), revision=spec.get("revision"),
                     text_field=spec.get("text_field", "text"),
                     weight=None if weight is None else float(weight), max_docs=spec.get("max_docs"),
                     holdout=holdout, key=where)
        src.validate()
        sources.append(src)
    return sources


# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------
def read_documents(path: str, text_field: str = "text", max_docs: Optional[int] = None,
                   key: str = "data") -> list[str]:
    """Read documents from jsonl (``text_field``), parquet (``text_field``) or plain text.

    Plain text (``.txt`` or any other suffix) holds one document per blank-line-separated block.
    """
    if not os.path.isfile(path):
        raise XltError(f"{key}: data file not found: {path}")
    docs: list[str] = []
    if path.endswith((".jsonl", ".json")):
        with open(path, "rb") as f:  # decoded line by line, so an encoding error names its line
            for lineno, raw in enumerate(f, 1):
                line = decode_line(raw, path, lineno, key)
                if not line.strip():
                    continue
                row = _json_line(line, path, lineno)
                docs.append(text_of(row, text_field, key, f"{path}:{lineno}"))
                if max_docs is not None and len(docs) >= max_docs:
                    break
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = read_parquet_checked(path, key, pq.read_table)
        if text_field not in table.column_names:
            raise XltError(f"{key}: {path} has no field {text_field!r} (fields: {', '.join(table.column_names)})")
        docs = [t for t in table.column(text_field).to_pylist() if isinstance(t, str)]
        docs = docs[:max_docs] if max_docs is not None else docs
    else:
        with open(path, "rb") as f:
            text = decode_text(f.read(), path, key).replace("\r\n", "\n")
        docs = [b.strip("\n") for b in text.split("\n\n") if b.strip()]
        docs = docs[:max_docs] if max_docs is not None else docs
    return docs


def text_of(row: Any, text_field: str, key: str, where: str) -> str:
    if not isinstance(row, dict) or text_field not in row:
        fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
        raise XltError(f"{key}: {where} has no field {text_field!r} (fields: {fields})")
    text = row[text_field]
    if not isinstance(text, str):
        raise XltError(f"{key}: {where}: field {text_field!r} is not a string")
    return text


def read_parquet_checked(path: str, key: str, read: Any) -> Any:
    """``read(path)`` (a pyarrow reader), with a file that is not parquet reported in one line."""
    import pyarrow as pa

    try:
        return read(path)
    except (pa.ArrowException, OSError) as e:
        raise XltError(f"{key}: {path} is not a readable parquet file ({str(e).splitlines()[0]})") from None


def _check_text_field(path: str, text_field: str, key: str) -> None:
    """Cheap checks of a local file (its first MiB at most), so a bad file fails before any model loads.

    jsonl: the head is UTF-8 text without NUL bytes, and each of its complete lines is blank or a JSON
    object whose ``text_field`` is a string. parquet: the schema reads and has ``text_field``. Other
    files (plain text): the head is UTF-8 text. Errors name the file and line. A bad byte past the
    head is reported, with its line, when the file is read (``read_documents``).
    """
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        names = read_parquet_checked(path, key, pq.read_schema).names
        if text_field not in names:
            raise XltError(f"{key}: {path} has no field {text_field!r} (fields: {', '.join(names)})")
        return
    head = read_text_head(path, key)
    if not path.endswith((".jsonl", ".json")):
        return
    lines = head.split("\n")
    complete = lines if os.path.getsize(path) <= HEAD_BYTES else lines[:-1]  # a cut last line is not judged
    first = True
    for lineno, line in enumerate(complete, 1):
        if not line.strip():
            continue
        row = _json_line(line, path, lineno)
        if not isinstance(row, dict):
            raise XltError(f"{key}: {path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
        text_of(row, text_field, key, path if first else f"{path}:{lineno}")
        first = False


def heldout_texts(sources: list[Source], eval_sources: Optional[list[Source]] = None,
                  max_docs: Optional[int] = None) -> dict[str, list[str]]:
    """Held-out documents per language: ``eval_sources`` if given, else each source's ``holdout`` split.

    The same documents are excluded from training (``Source.split_holdout``), so evaluation is fair.
    """
    per_source: dict[str, list[list[str]]] = {}
    for s in eval_sources or sources:
        if s.streaming:
            if not eval_sources:
                continue  # a streamed training source has no held-out split
            # A streamed evaluation set: its first documents, in order (no shuffle: the same every run).
            docs = [text_of(row, s.text_field, s.key, s.dataset)
                    for row in itertools.islice(s.open_hub_dataset(), max_docs or 1000)]
        else:
            docs = s.all_documents() if eval_sources else s.split_holdout()[1]
        if docs:
            per_source.setdefault(s.lang, []).append(docs)
    out = {}
    for lang, lists in per_source.items():
        # Round-robin over sources, so a cap keeps every source represented.
        merged = [d for group in itertools.zip_longest(*lists) for d in group if d is not None]
        out[lang] = merged[:max_docs] if max_docs is not None else merged
    return out
