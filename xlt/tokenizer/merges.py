"""Learn new BPE merges that continue an existing tokenizer's merges on a Japanese corpus.

The corpus is first cut exactly as the base tokenizer cuts it (its own normalizer, pre-tokenizer
and merges), so every training "word" is a sequence of *base tokens*. New merges are then learned
over those base tokens with the ``tokenizers`` BpeTrainer: each distinct base token is mapped to one
private-use character, the trainer runs in Rust over those characters, and its merges are mapped
back to strings of the base vocabulary. Appended after all original merges, they only fire where
the original merges are exhausted, which is exactly where they were learned.

Two tokenizer families are supported:

* ``byte_level``: GPT-2 style byte-level BPE (GPT-2, SmolLM2, Llama-3, Qwen, GPT-NeoX).
* ``metaspace``: SentencePiece-style BPE with ``▁`` for spaces and ``<0xNN>`` byte fallback
  (Llama-2, Mistral). Characters that the base vocabulary lacks (byte-fallback characters) become
  new single-character tokens first, then merges are learned over characters and base pieces.
"""

from __future__ import annotations

import json
import os
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from xlt.config import XltError

BYTE_LEVEL = "byte_level"
METASPACE = "metaspace"
BYTE_TOKEN_RE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_PUA_START = 0xF0000  # Supplementary Private Use Area-A/B: 131K code points, never in real text


# ---------------------------------------------------------------------------------------------
# tokenizer.json: locate, read, classify
# ---------------------------------------------------------------------------------------------
def tokenizer_json_path(spec: str) -> str:
    """Path of ``tokenizer.json`` for a model spec (dir, embedded alias, or a tokenizer.json file).

    Hub ids are fetched with ``huggingface_hub`` (tokenizer files only, never weights).
    """
    if spec.endswith(".json") and os.path.isfile(spec):
        return spec
    from xlt.models import resolve_model

    where = resolve_model(spec)
    if os.path.isdir(where):
        path = os.path.join(where, "tokenizer.json")
        if not os.path.isfile(path):
            slow = [f for f in ("tokenizer.model", "spiece.model", "vocab.json") if os.path.isfile(os.path.join(where, f))]
            hint = ""
            if slow and slow[0] == "tokenizer.model":
                hint = (f" (it has only the slow tokenizer.model; for a SentencePiece BPE convert it once with "
                        f"`python -m xlt.tokenizer.spm {where}`)")
            elif slow:
                hint = f" (it has only the slow {slow[0]}; save the fast tokenizer with transformers first)"
            raise XltError(f"tokenizer: {spec} has no tokenizer.json{hint}")
        return path
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(where, "tokenizer.json")
    except Exception as e:  # noqa: BLE001 - one clear line for the user
        raise XltError(f"tokenizer: cannot get tokenizer.json of {spec}: {str(e).splitlines()[0]}") from None


def read_tokenizer_json(spec: str) -> dict:
    path = tokenizer_json_path(spec)
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise XltError(f"tokenizer: {path} is not valid JSON ({e.msg})") from None


def _components(node: Optional[dict]) -> list[dict]:
    """Flatten a (possibly nested) Sequence of normalizers / pre-tokenizers / decoders."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        out = []
        for key in ("pretokenizers", "normalizers", "decoders", "processors"):
            for child in node.get(key) or []:
                out.extend(_components(child))
        return out
    return [node]


def detect_family(tj: dict) -> str:
    """'byte_level' or 'metaspace'; an ``XltError`` naming the type for anything else."""
    model = tj.get("model") or {}
    mtype = model.get("type")
    if mtype != "BPE":
        raise XltError(f"tokenizer: unsupported tokenizer model type {mtype} (xlt extends BPE tokenizers only: "
                       f"byte-level BPE or SentencePiece-style BPE with byte fallback)")
    types = {c.get("type") for part in ("pre_tokenizer", "decoder") for c in _components(tj.get(part))}
    if "ByteLevel" in types:
        return BYTE_LEVEL
    norm = _components(tj.get("normalizer"))
    spaces_to_meta = any(c.get("type") == "Replace" and (c.get("content") == "▁") for c in norm)
    if "Metaspace" in types or spaces_to_meta:
        if not model.get("byte_fallback"):
            raise XltError("tokenizer: SentencePiece-style BPE without byte_fallback is not supported "
                           "(unknown characters would become <unk>, so new tokens could not be learned losslessly)")
        return METASPACE
    raise XltError(f"tokenizer: unsupported BPE layout (pre-tokenizer/decoder types {sorted(t for t in types if t)}); "
                   f"expected ByteLevel or Metaspace")


def merges_as_pairs(model: dict) -> list[tuple[str, str]]:
    """tokenizer.json stores merges as 'a b' strings (old) or [a, b] pairs (new)."""
    out = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            a, b = m.split(" ", 1)
            out.append((a, b))
        else:
            out.append((m[0], m[1]))
    return out


# ---------------------------------------------------------------------------------------------
# Token surfaces
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: byte-level character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(token: str, family: str) -> bytes:
    """The bytes of text a vocabulary string stands for (``▁`` is a space in metaspace)."""
    if family == BYTE_LEVEL:
        dec = byte_decoder()
        return bytes(dec[c] for c in token)
    m = BYTE_TOKEN_RE.match(token)
    if m:
        return bytes([int(m.group(1), 16)])
    return token.replace("▁", " ").encode("utf-8")


def is_ascii_token(token: str, family: str) -> bool:
    try:
        return all(b < 128 for b in token_bytes(token, family))
    except KeyError:
        return False


def is_whole_text(token: str, family: str) -> bool:
    """True when the token's bytes are complete UTF-8 characters."""
    try:
        token_bytes(token, family).decode("utf-8")
        return True
    except (UnicodeDecodeError, KeyError):
        return False


def token_text(token: str, family: str) -> str:
    return token_bytes(token, family).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
JA_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff66-\uff9f]")


def japanese_share(texts: Iterable[str]) -> float:
    n = ja = 0
    for t in texts:
        n += len(t)
        ja += len(JA_RE.findall(t))
    return ja / n if n else 0.0


@dataclass
class MergePlan:
    """New merges (in priority order) and new vocabulary strings, as learned from a corpus."""

    family: str
    merges: list[tuple[str, str]] = field(default_factory=list)
    new_chars: list[str] = field(default_factory=list)  # metaspace: characters added as single tokens
    stats: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict, compare=False)  # seconds per phase, processes used


def _mecab_boundaries(text: str) -> set[int]:
    """Character offsets where a MeCab (unidic-lite) word starts."""
    try:
        import fugashi
    except ImportError:
        raise XltError("mecab: needs the PyPI packages fugashi and unidic-lite: pip install fugashi unidic-lite") from None
    tagger = _tagger(fugashi)
    out, pos = set(), 0
    for w in tagger(text):
        s = w.surface
        if not s:
            continue
        i = text.find(s, pos)
        if i < 0:
            continue
        out.add(i)
        out.add(i + len(s))
        pos = i + len(s)
    return out


@lru_cache(maxsize=1)
def _tagger(fugashi_mod):  # noqa: ANN001
    try:
        return fugashi_mod.Tagger()
    except RuntimeError as e:
        raise XltError(f"mecab: cannot start MeCab ({str(e).splitlines()[0]}); pip install unidic-lite") from None


class _UnitWords:
    """Cuts one encoded piece of text into training words (the rule of :func:`corpus_words`).

    Token classifications (byte-fallback byte, ASCII) are memoised per token string: the cut loop is
    the one per-token Python step left, so it must stay cheap.
    """

    def __init__(self, family: str, vocab: dict[str, int]):
        self.family, self.vocab = family, vocab
        self._byte: dict[str, Optional[int]] = {}
        self._ascii: dict[str, bool] = {}
        self._units: dict[str, str] = {}  # one shared string object per unit (memory of the word tuples)

    def byte_of(self, tok: str) -> Optional[int]:
        b = self._byte.get(tok, -1)
        if b == -1:
            m = BYTE_TOKEN_RE.match(tok) if self.family == METASPACE else None
            b = self._byte[tok] = int(m.group(1), 16) if m else None
        return b

    def is_ascii(self, u: str) -> bool:
        a = self._ascii.get(u)
        if a is None:
            a = self._ascii[u] = is_ascii_token(u, self.family) if u in self.vocab else u.isascii()
        return a

    def add(self, words: Counter, toks: list[str], wids: list, offs: list, bounds: Optional[set[int]],
            count: int = 1) -> None:
        """Add ``count`` times the words of one encoded piece (tokens, word ids, offsets) to ``words``."""
        family, vocab, units_memo, ascii_memo, byte_memo = self.family, self.vocab, self._units, self._ascii, self._byte
        meta = family == METASPACE
        cur: list[str] = []
        prev_word, prev_ascii = None, False
        i, n = 0, len(toks)
        while i < n:
            tok, wid = toks[i], wids[i]
            if meta and (byte_memo[tok] if tok in byte_memo else self.byte_of(tok)) is not None:
                # Gather a byte-fallback run into characters: each becomes a candidate new token.
                j, raw = i, bytearray()
                while j < n and self.byte_of(toks[j]) is not None:
                    raw.append(self.byte_of(toks[j]))
                    j += 1
                units = list(bytes(raw).decode("utf-8", errors="replace"))
                unit_starts = [offs[i][0] if offs is not None else None] + [None] * (len(units) - 1)
                i = j
            else:
                units, unit_starts = [tok], [offs[i][0] if offs is not None else None]
                i += 1
            for u, ustart in zip(units, unit_starts):
                asc = ascii_memo.get(u)
                if asc is None:
                    asc = self.is_ascii(u)
                cut = (not cur or wid != prev_word or (asc and prev_ascii)
                       or (meta and u.startswith("▁"))
                       or (bounds is not None and ustart is not None and ustart in bounds))
                if cut and cur:
                    if len(cur) > 1 or cur[0] not in vocab:
                        words[tuple(cur)] += count
                    cur = []
                cur.append(units_memo.get(u) or units_memo.setdefault(u, u))
                prev_word, prev_ascii = wid, asc
        if cur and (len(cur) > 1 or cur[0] not in vocab):
            words[tuple(cur)] += count


@lru_cache(maxsize=1)
def _wakati_tagger():
    """A MeCab tagger that prints surfaces separated by spaces (no per-word Python node objects)."""
    try:
        import fugashi
    except ImportError:
        raise XltError("mecab: needs the PyPI packages fugashi and unidic-lite: pip install fugashi unidic-lite") from None
    try:
        return fugashi.Tagger("-Owakati")
    except RuntimeError as e:
        raise XltError(f"mecab: cannot start MeCab ({str(e).splitlines()[0]}); pip install unidic-lite") from None


def _mecab_boundaries_fast(text: str) -> set[int]:
    """Same set as :func:`_mecab_boundaries` (tested), from MeCab's wakati output.

    MeCab never puts a space inside a surface (spaces separate words in its input), so splitting
    the wakati line on spaces gives the node surfaces, without a Python object per node. fugashi
    strips the line's end, which loses trailing full-width-space words: such texts take the node path.
    """
    if text[-1:].isspace():
        return _mecab_boundaries(text)
    out, pos, find = set(), 0, text.find
    line = _wakati_tagger().parse(text)
    if not line:
        return out
    for s in line.split(" "):
        if not s:
            continue
        i = find(s, pos)
        if i < 0:
            continue
        pos = i + len(s)
        out.add(i)
        out.add(pos)
    return out


class _FastUnitWords(_UnitWords):
    """:class:`_UnitWords` with a cheaper per-token loop (same words, tested against it).

    Why not the library: the rule (cut at pre-token, ASCII-pair, ``▁`` and MeCab boundaries, with
    byte-fallback runs gathered into characters) has no counterpart in ``tokenizers``. The loop does
    one dict lookup per token (its class: byte value, ASCII, starts with ``▁``), allocates nothing per
    token, and interns unit strings only when a word is new to the counter.
    """

    def __init__(self, family: str, vocab: dict[str, int]):
        super().__init__(family, vocab)
        self._cls: dict[str, tuple] = {}

    def _classify(self, tok: str) -> tuple:
        c = self._cls[tok] = (self.byte_of(tok), self.is_ascii(tok), self.family == METASPACE and tok.startswith("▁"))
        return c

    def _put(self, words: Counter, cur: list[str], count: int) -> None:
        key = tuple(cur)
        if key in words:
            words[key] += count
        elif len(cur) > 1 or cur[0] not in self.vocab:
            memo = self._units
            words[tuple(memo.get(u) or memo.setdefault(u, u) for u in cur)] = count

    def add(self, words: Counter, toks: list[str], wids: list, offs: list, bounds: Optional[set[int]],
            count: int = 1) -> None:
        """Same as :meth:`_UnitWords.add`."""
        cls_memo, classify, put, vocab = self._cls, self._classify, self._put, self.vocab
        cur: list[str] = []
        prev_word, prev_ascii = None, False
        check = bounds is not None and offs is not None
        i, n = 0, len(toks)
        while i < n:
            tok = toks[i]
            c = cls_memo.get(tok) or classify(tok)
            if c[0] is not None:  # byte-fallback run (metaspace): the reference's rule, unit by unit
                wid = wids[i]
                j, raw = i, bytearray()
                while j < n and self.byte_of(toks[j]) is not None:
                    raw.append(self.byte_of(toks[j]))
                    j += 1
                first = offs[i][0] if offs is not None else None
                for k, u in enumerate(bytes(raw).decode("utf-8", errors="replace")):
                    asc = self.is_ascii(u)
                    if cur and (wid != prev_word or (asc and prev_ascii) or u.startswith("▁")
                                or (k == 0 and bounds is not None and first is not None and first in bounds)):
                        put(words, cur, count)
                        cur = []
                    cur.append(u)
                    prev_word, prev_ascii = wid, asc
                i = j
                continue
            wid, asc = wids[i], c[1]
            if cur and (wid != prev_word or (asc and prev_ascii) or c[2] or (check and offs[i][0] in bounds)):
                if len(cur) > 1 or cur[0] not in vocab:  # inline: a single base token is no word
                    put(words, cur, count)
                cur = []
            cur.append(tok)
            prev_word, prev_ascii = wid, asc
            i += 1
        if cur:
            put(words, cur, count)


def _mecab_count(base, cutter: _UnitWords, texts: list[str], sub_chars: int = 65536) -> Counter:
    """Words of ``texts`` with MeCab boundaries, in first-occurrence order (the reference's rule).

    Encodes ``sub_chars`` characters at a time so that the Encoding objects stay small.
    """
    words: Counter = Counter()
    i = 0
    while i < len(texts):
        j, n = i, 0
        while j < len(texts) and (j == i or n < sub_chars):
            n += len(texts[j])
            j += 1
        chunk = texts[i:j]
        for text, enc in zip(chunk, base.encode_batch(chunk, add_special_tokens=False)):
            cutter.add(words, enc.tokens, enc.word_ids, enc.offsets, _mecab_boundaries_fast(text))
        i = j
    return words


_WORKER: Optional[tuple] = None  # (base tokenizer, cutter) of a counting worker process


def _worker_init(tokenizer_str: str, family: str) -> None:
    """Counting worker: its own base tokenizer and cutter; one thread (the pool is the parallelism)."""
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

    base = Tokenizer.from_str(tokenizer_str)
    _WORKER = (base, _FastUnitWords(family, base.get_vocab()))


def _worker_count(texts: list[str]) -> Counter:
    return _mecab_count(_WORKER[0], _WORKER[1], texts)


def default_num_proc() -> int:
    """Processes for MeCab segmentation: the CPUs this process may use, at most 16."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 16))


def _text_batches(texts: Iterable[str], batch_chars: int, nfkc: bool) -> Iterable[list[str]]:
    """Consecutive lists of texts of about ``batch_chars`` characters (the last may be shorter)."""
    batch, n = [], 0
    for text in texts:
        if nfkc:
            text = unicodedata.normalize("NFKC", text)
        batch.append(text)
        n += len(text)
        if n >= batch_chars:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def _mecab_words(base, family: str, texts: Iterable[str], nfkc: bool, batch_chars: int, num_proc: int) -> Counter:
    """MeCab words of the corpus, counted in ``num_proc`` processes, streaming.

    Guarantees: the same Counter, in the same key order, as :func:`corpus_words_reference` on the
    whole corpus, for any ``num_proc`` and ``batch_chars`` (tested): batches are consecutive, each
    worker counts a batch in first-occurrence order, and the main process merges the batch Counters
    in batch order, so a word is inserted where it first occurs in the corpus (the order the
    trainer's tie-breaking sees). Bounded memory: at most ``2 * num_proc`` batches of text are in
    flight; what is kept is the counts.

    Why a process pool: MeCab and the per-token cut are Python-bound (the GIL), one text at a time,
    and independent across texts. Workers are started with ``spawn`` (no inherited threads or locks
    of the parent's tokenizers / torch thread pools).
    """
    words: Counter = Counter()
    batches = _text_batches(texts, batch_chars, nfkc)
    if num_proc <= 1:
        cutter = _FastUnitWords(family, base.get_vocab())
        for b in batches:
            words.update(_mecab_count(base, cutter, b))
        return words
    import multiprocessing as mp
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    _wakati_tagger()  # a missing MeCab is one clear error here, not one per worker
    # ProcessPoolExecutor, not multiprocessing.Pool: a worker that dies raises here instead of hanging.
    with ProcessPoolExecutor(num_proc, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(base.to_str(), family)) as pool:
        inflight: deque = deque()
        for b in batches:
            inflight.append(pool.submit(_worker_count, b))
            if len(inflight) >= 2 * num_proc:
                words.update(inflight.popleft().result())
        while inflight:
            words.update(inflight.popleft().result())
    return words


def corpus_words_reference(base, family: str, texts: list[str], mecab: bool = False) -> Counter:
    """:func:`corpus_words` the direct way: every text encoded whole and cut token by token.

    Used for MeCab (its boundaries depend on the whole text) and for texts that hold an added
    token's content; kept as the definition the fast path is tested against.
    """
    words: Counter = Counter()
    cutter = _UnitWords(family, base.get_vocab())
    _reference_into(words, cutter, base, texts, mecab)
    return words


def _reference_into(words: Counter, cutter: _UnitWords, base, texts: list[str], mecab: bool) -> None:
    for text, enc in zip(texts, base.encode_batch(texts, add_special_tokens=False)):
        bounds = _mecab_boundaries(text) if mecab else None
        cutter.add(words, enc.tokens, enc.word_ids, enc.offsets, bounds)


def _metaspace_split_ok(tj_model: dict, vocab: dict[str, int]) -> bool:
    """True when no base merge can join a piece ending in a non-``▁`` character to a following ``▁``.

    Then the base BPE segments ``a▁b`` as seg(``a``) + seg(``▁b``) wherever ``a`` ends in another
    character: the first merge across that point would be a pair (x, y) with y starting with ``▁``
    and x ending in the character before it, and every such pair here has x ending in ``▁``.
    """
    if "▁" not in vocab:
        return False
    return all(x.endswith("▁") for x, y in merges_as_pairs(tj_model) if y.startswith("▁"))


_SPACE_SPLIT = re.compile(r"(?<=[^▁])(?=▁)")


def corpus_words(base, family: str, texts: Iterable[str], mecab: bool = False, nfkc: bool = False,
                 batch_chars: int = 1_000_000, num_proc: Optional[int] = None) -> Counter:
    """Count training words, each a tuple of units (base-vocabulary strings, or new characters).

    Words are cut where the base tokenizer cuts them (its pre-tokenizer; for metaspace before each
    ``▁``), between two pure-ASCII tokens (so no new merge can ever fire on ASCII text: English and
    code keep their ids), and optionally at MeCab word boundaries.

    Streaming and bounded: ``texts`` is read once, ``batch_chars`` at a time; what is kept is a count
    of distinct pieces, never the text. Same result as :func:`corpus_words_reference` (tested).

    Why this way (profiled at 1M characters, the old per-text path spent ~60% of its time in a
    Python loop over every token): the text is cut by the base tokenizer's own normalizer and
    pre-tokenizer (Rust) into pieces that the base BPE segments independently of their neighbours:
    its pre-token words, and for metaspace also each run that starts at a ``▁`` after another
    character (when :func:`_metaspace_split_ok`). Distinct pieces are counted (C ``Counter``), then each
    distinct piece is encoded once by the bare BPE model (Rust, batched) and cut once, with its count.
    Texts where this could differ from encoding the whole text (an added token's content inside, a
    metaspace pre-token not starting with ``▁``) take the reference path. Words are counted in
    first-occurrence order, as the reference does (ties among new characters keep it).

    MeCab (boundaries depend on the whole text): the reference rule, text by text, in ``num_proc``
    processes (default :func:`default_num_proc`) over batches of ``batch_chars`` characters; see
    :func:`_mecab_words`.
    """
    if mecab:
        return _mecab_words(base, family, texts, nfkc, batch_chars, default_num_proc() if num_proc is None else num_proc)

    vocab = base.get_vocab()
    cutter = _UnitWords(family, vocab)
    words: Counter = Counter()
    tj = json.loads(base.to_str())
    added = [t["content"] for t in tj.get("added_tokens") or [] if t.get("content")]
    added_re = re.compile("|".join(re.escape(a) for a in sorted(added, key=len, reverse=True))) if added else None
    split_spaces = family == METASPACE and _metaspace_split_ok(tj["model"], vocab)
    norm, pre = base.normalizer, base.pre_tokenizer
    # Keys in first-occurrence order (words, and so ties among new characters, keep the corpus order):
    # a str is a piece for the bare model, a 1-tuple a whole text for the reference path.
    pieces: Counter = Counter()
    for text in texts:
        if nfkc:
            text = unicodedata.normalize("NFKC", text)
        normed = norm.normalize_str(text) if norm is not None else text
        if added_re is not None and (added_re.search(text) or added_re.search(normed)):
            pieces[(text,)] += 1
            continue
        splits = [s for s, _ in pre.pre_tokenize_str(normed)] if pre is not None else [normed]
        if family == METASPACE:
            if any(not s.startswith("▁") for s in splits[1:]):
                pieces[(text,)] += 1
                continue
            if split_spaces:
                splits = [c for s in splits for c in _SPACE_SPLIT.split(s)]
        pieces.update(splits)

    _cut_pieces(words, cutter, base, tj, pieces)
    return words


def _cut_pieces(words: Counter, cutter: _UnitWords, base, tj: dict, pieces: Counter) -> None:
    """Each distinct piece encoded once and cut into ``words`` with its count: a str by the bare BPE model (no
    normalizer, pre-tokenizer, post-processor or added tokens: pieces are already cut), a 1-tuple (a whole text)
    by the base tokenizer, as the reference path does."""
    bare_tj = dict(tj, normalizer=None, pre_tokenizer=None, post_processor=None, added_tokens=[])
    bare = Tokenizer.from_str(json.dumps(bare_tj))
    keys = [p for p in pieces if p]
    for k in range(0, len(keys), 65536):
        chunk = keys[k:k + 65536]
        plain = [p for p in chunk if isinstance(p, str)]
        whole = [p[0] for p in chunk if not isinstance(p, str)]
        encs = iter(bare.encode_batch(plain, add_special_tokens=False) if plain else [])
        whole_encs = iter(base.encode_batch(whole, add_special_tokens=False) if whole else [])
        for p in chunk:
            if isinstance(p, str):
                toks = next(encs).tokens
                cutter.add(words, toks, [0] * len(toks), None, None, count=pieces[p])
            else:
                enc = next(whole_encs)
                cutter.add(words, enc.tokens, enc.word_ids, enc.offsets, None, count=pieces[p])


def _pua_lines(words: Counter, to_pua: dict[str, str], batch_lines: int = 4096) -> Iterator[str]:
    """The BPE trainer's input: each word (its units as private-use characters) once per occurrence, one per
    line (the trainer counts them), in batches of at most ``batch_lines`` lines."""
    batch: list[str] = []
    for w, c in words.items():
        s = "".join(to_pua[u] for u in w)
        while c > 0:
            take = min(c, batch_lines - len(batch))
            batch.extend([s] * take)
            c -= take
            if len(batch) >= batch_lines:
                yield "\n".join(batch)
                batch = []
    if batch:
        yield "\n".join(batch)


def learn_merges(base, family: str, texts: Iterable[str], n_merges: int, min_frequency: int = 2,
                 max_token_chars: int = 16, nfkc: bool = False, mecab: bool = False,
                 num_proc: Optional[int] = None) -> MergePlan:
    """Learn up to ``n_merges`` raw merges (more than needed: the caller filters and cuts).

    ``num_proc``: processes that segment and count with MeCab (default :func:`default_num_proc`);
    the merges do not depend on it.
    """
    t0 = time.perf_counter()
    # nfkc: only the training text; the tokenizer's own normalizer stays as it is.
    words = corpus_words(base, family, texts, mecab=mecab, nfkc=nfkc, num_proc=num_proc)
    t_count = time.perf_counter() - t0
    vocab = base.get_vocab()
    units = sorted({u for w in words for u in w})
    if len(units) > 0x10FFFD - _PUA_START:
        raise XltError("tokenizer: too many distinct base tokens in the corpus")
    to_pua = {u: chr(_PUA_START + i) for i, u in enumerate(units)}
    from_pua = {v: k for k, v in to_pua.items()}

    char_counts: Counter = Counter()
    for w, c in words.items():
        for u in w:
            if u not in vocab:
                char_counts[u] += c

    # Rust BPE over private-use characters; one word per line, split on the separator.
    trainer = trainers.BpeTrainer(vocab_size=len(units) + n_merges, min_frequency=max(1, min_frequency),
                                  show_progress=False, initial_alphabet=list(to_pua.values()),
                                  limit_alphabet=len(units) + 1, max_token_length=max(2, 2 * max_token_chars))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Split("\n", behavior="removed")

    t0 = time.perf_counter()
    tok.train_from_iterator(_pua_lines(words, to_pua), trainer=trainer)
    t_train = time.perf_counter() - t0
    pua_merges = merges_as_pairs(json.loads(tok.to_str())["model"])
    merges = [("".join(from_pua[c] for c in a), "".join(from_pua[c] for c in b)) for a, b in pua_merges]
    new_chars = [c for c, k in char_counts.most_common() if k >= max(1, min_frequency)]
    return MergePlan(family=family, merges=merges, new_chars=new_chars,
                     stats={"words": sum(words.values()), "distinct_words": len(words), "units": len(units),
                            "raw_merges": len(merges)},
                     timings={"count_seconds": t_count, "train_seconds": t_train,
                              "num_proc": (default_num_proc() if num_proc is None else num_proc) if mecab else 1})


def unreachable_tokens(tok, family: str, ids: list[int]) -> list[int]:
    """The ids among ``ids`` that are not reachable (the rule in ``xlt.tokenizer.extend``'s docstring): the BPE model
    run on the token's own string gives another segmentation, or a whole-text token's decoded text does not encode
    back to it alone."""
    bad = []
    for i in ids:
        s = tok.id_to_token(i)
        if [t.id for t in tok.model.tokenize(s)] != [i]:
            bad.append(i)
            continue
        whole = is_whole_text(s, family) and (family == BYTE_LEVEL or s.startswith("▁"))
        if whole:
            text = tok.decode([i], skip_special_tokens=False)
            if tok.encode(text, add_special_tokens=False).ids != [i]:
                bad.append(i)
    return bad
