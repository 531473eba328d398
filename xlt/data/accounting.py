"""What the stream read and what it trained on: tokens, characters, documents and epochs.

Everything is a plain JSON-serialisable dict so it can go into trainer logs, every checkpoint's
stream state and ``report.json`` unchanged.

* ``tokens_read``: tokens of the documents taken from the sources (a document counts in full
  as soon as it is opened, even if its tail continues in a later row).
* ``tokens_trained``: tokens placed into emitted rows (every row slot is a document token: the
  packer never pads, truncates or drops).
* ``target_tokens``: positions whose label is a training target (not -100).
* ``chars``: characters of the documents read, for bits-per-character style figures.
* ``epochs_by_source``: passes over each source (fractional: 1.25 = a quarter into the second).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

from xlt.data.sources import LANGS


class Accounting:
    """Counters of one stream position; cheap to copy (a few small dicts)."""

    def __init__(self, source_langs: dict[str, str]):
        self.source_langs = dict(source_langs)
        names = list(source_langs)
        self.tokens_read = {lang: 0 for lang in LANGS}
        self.tokens_trained = {lang: 0 for lang in LANGS}
        self.target_tokens = {lang: 0 for lang in LANGS}
        self.chars = {lang: 0 for lang in LANGS}
        self.docs = {lang: 0 for lang in LANGS}
        self.tokens_by_source = dict.fromkeys(names, 0)
        self.tokens_read_by_source = dict.fromkeys(names, 0)
        self.chars_by_source = dict.fromkeys(names, 0)
        self.docs_by_source = dict.fromkeys(names, 0)
        self.epochs_by_source = dict.fromkeys(names, 0.0)
        self.rows = 0

    # -- updates -------------------------------------------------------------------------------
    def add_read(self, source: str, n_tokens: int, n_chars: int) -> None:
        lang = self.source_langs[source]
        self.tokens_read[lang] += n_tokens
        self.tokens_read_by_source[source] += n_tokens
        self.chars[lang] += n_chars
        self.chars_by_source[source] += n_chars
        self.docs[lang] += 1
        self.docs_by_source[source] += 1

    def add_trained(self, source: str, n_tokens: int, n_targets: int) -> None:
        lang = self.source_langs[source]
        self.tokens_trained[lang] += n_tokens
        self.tokens_by_source[source] += n_tokens
        self.target_tokens[lang] += n_targets

    # -- views ---------------------------------------------------------------------------------
    @property
    def total_trained(self) -> int:
        return sum(self.tokens_trained.values())

    def ja_share(self) -> float:
        total = self.total_trained
        return self.tokens_trained["ja"] / total if total else 0.0

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "tokens_read": dict(self.tokens_read),
            "tokens_trained": dict(self.tokens_trained),
            "target_tokens": dict(self.target_tokens),
            "tokens_by_source": dict(self.tokens_by_source),
            "tokens_read_by_source": dict(self.tokens_read_by_source),
            "chars": dict(self.chars),
            "chars_by_source": dict(self.chars_by_source),
            "docs": dict(self.docs),
            "docs_by_source": dict(self.docs_by_source),
            "epochs_by_source": dict(self.epochs_by_source),
            "ja_share_trained": self.ja_share(),
        }

    @classmethod
    def from_dict(cls, d: dict, source_langs: dict[str, str]) -> Accounting:
        acc = cls(source_langs)
        for key in ("tokens_read", "tokens_trained", "target_tokens", "chars", "docs", "tokens_by_source",
                    "tokens_read_by_source", "chars_by_source", "docs_by_source", "epochs_by_source"):
            getattr(acc, key).update(copy.deepcopy(d.get(key, {})))
        acc.rows = int(d.get("rows", 0))
        return acc


def log_metrics(acc: dict, prefix: str = "data/") -> dict[str, float]:
    """Flat scalars for trainer logs (report_to): ``data/tokens_trained_ja`` etc."""
    out: dict[str, float] = {}
    for key in ("tokens_read", "tokens_trained", "chars"):
        for lang, v in acc[key].items():
            out[f"{prefix}{key}_{lang}"] = float(v)
    for name, v in acc["tokens_by_source"].items():
        out[f"{prefix}tokens_trained_src_{name}"] = float(v)
    for name, v in acc["epochs_by_source"].items():
        out[f"{prefix}epochs_{name}"] = float(v)
    out[f"{prefix}ja_share_trained"] = float(acc["ja_share_trained"])
    return out


def sum_tokens(acc: dict, key: str = "tokens_trained", langs: Iterable[str] = LANGS) -> int:
    return int(sum(acc[key][lang] for lang in langs))
