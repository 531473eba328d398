"""Document cleaning: optional NFKC for Japanese, too-short / low-Japanese-share filters, exact dedup.

Each dropped document is counted under one reason (the first check it fails), so a report
says why a source shrank: ``{"empty": 3, "too_short": 10, "low_ja_share": 2, "duplicate": 7}``.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from typing import Any, Optional

REASONS = ("empty", "too_short", "low_ja_share", "duplicate")

# Hiragana, Katakana (+ phonetic extensions, half-width forms), CJK ideographs (+ ext. A,
# compatibility), the iteration mark 々 and the prolonged sound mark ー (inside Katakana).
_JA_CHARS = re.compile(r"[\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3005]")
_SPACE = re.compile(r"\s+")


def ja_share(text: str) -> float:
    """Share of non-whitespace characters written in Japanese script (kana or kanji)."""
    visible = len(_SPACE.sub("", text))
    if visible == 0:
        return 0.0
    return len(_JA_CHARS.findall(text)) / visible


def doc_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class Cleaner:
    """Stateful filter for one source (the dedup set is per source)."""

    def __init__(self, lang: str, args: Any):
        self.lang = lang
        self.nfkc = bool(args.clean_nfkc) and lang == "ja"
        self.min_chars = int(args.clean_min_chars)
        self.min_ja_share = float(args.clean_min_ja_share) if lang == "ja" else 0.0
        self.dedup = bool(args.clean_dedup)
        self.seen: set[bytes] = set()
        self.dropped: Counter = Counter()
        self.kept = 0
        self.heldout_kept = 0

    def __call__(self, text: str) -> Optional[str]:
        """The cleaned document, or None when it is dropped (the reason is counted)."""
        if self.nfkc:
            text = unicodedata.normalize("NFKC", text)
        reason = self._reason(text)
        if reason is not None:
            self.dropped[reason] += 1
            return None
        self.kept += 1
        return text

    def _reason(self, text: str) -> Optional[str]:
        stripped = text.strip()
        if not stripped:
            return "empty"
        if len(stripped) < self.min_chars:
            return "too_short"
        if self.min_ja_share > 0 and ja_share(stripped) < self.min_ja_share:
            return "low_ja_share"
        if self.dedup:
            h = doc_hash(text)
            if h in self.seen:
                return "duplicate"
            self.seen.add(h)
        return None

    def report(self) -> dict:
        return {"kept": self.kept, "heldout_kept": self.heldout_kept, "dropped": {r: int(self.dropped.get(r, 0)) for r in REASONS}}


def clean_documents(docs: Iterable[str], lang: str, args: Any, cleaner: Optional[Cleaner] = None
                    ) -> tuple[list[str], Cleaner]:
    """Clean a list of documents; pass the same ``cleaner`` again to dedup against earlier docs."""
    cleaner = cleaner or Cleaner(lang, args)
    kept = [t for t in (cleaner(d) for d in docs) if t is not None]
    return kept, cleaner
