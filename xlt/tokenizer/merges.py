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
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

from xlt.config import XltError

BYTE_LEVEL = "byte_level"
METASPACE = "metaspace"
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
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
    m = _BYTE_TOKEN.match(token)
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


def corpus_words(base, family: str, texts: list[str], mecab: bool = False) -> Counter:
    """Count training words, each a tuple of units (base-vocabulary strings, or new characters).

    Words are cut where the base tokenizer cuts them (its pre-tokenizer; for metaspace before each
    ``▁``), between two pure-ASCII tokens (so no new merge can ever fire on ASCII text: English and
    code keep their ids), and optionally at MeCab word boundaries.
    """
    words: Counter = Counter()
    vocab = base.get_vocab()
    encs = base.encode_batch(texts, add_special_tokens=False)
    for text, enc in zip(texts, encs):
        bounds = _mecab_boundaries(text) if mecab else None
        cur: list[str] = []
        prev_word, prev_ascii = None, False
        toks, wids, offs = enc.tokens, enc.word_ids, enc.offsets
        i, n = 0, len(toks)
        while i < n:
            tok, wid, (start, _) = toks[i], wids[i], offs[i]
            if family == METASPACE and _BYTE_TOKEN.match(tok):
                # Gather a byte-fallback run into characters: each becomes a candidate new token.
                j, raw = i, b""
                while j < n and _BYTE_TOKEN.match(toks[j]):
                    raw += token_bytes(toks[j], family)
                    j += 1
                units = list(raw.decode("utf-8", errors="replace"))
                unit_starts = [offs[i][0]] + [None] * (len(units) - 1)
                i = j
            else:
                units, unit_starts = [tok], [start]
                i += 1
            for u, ustart in zip(units, unit_starts):
                asc = is_ascii_token(u, family) if u in vocab else u.isascii()
                cut = (not cur or wid != prev_word or (asc and prev_ascii)
                       or (family == METASPACE and u.startswith("▁"))
                       or (bounds is not None and ustart is not None and ustart in bounds))
                if cut and cur:
                    if len(cur) > 1 or cur[0] not in vocab:
                        words[tuple(cur)] += 1
                    cur = []
                cur.append(u)
                prev_word, prev_ascii = wid, asc
        if cur and (len(cur) > 1 or cur[0] not in vocab):
            words[tuple(cur)] += 1
    return words


def learn_merges(base, family: str, texts: list[str], n_merges: int, min_frequency: int = 2,
                 max_token_chars: int = 16, nfkc: bool = False, mecab: bool = False) -> MergePlan:
    """Learn up to ``n_merges`` raw merges (more than needed: the caller filters and cuts)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if nfkc:  # only the training text: the tokenizer's own normalizer stays as it is
        texts = [unicodedata.normalize("NFKC", t) for t in texts]
    words = corpus_words(base, family, texts, mecab=mecab)
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

    def lines() -> Iterable[str]:
        batch: list[str] = []
        for w, c in words.items():
            s = "".join(to_pua[u] for u in w)
            batch.extend([s] * c)
            if len(batch) >= 4096:
                yield "\n".join(batch)
                batch = []
        if batch:
            yield "\n".join(batch)

    tok.train_from_iterator(lines(), trainer=trainer)
    pua_merges = merges_as_pairs(json.loads(tok.to_str())["model"])
    merges = [("".join(from_pua[c] for c in a), "".join(from_pua[c] for c in b)) for a, b in pua_merges]
    new_chars = [c for c, k in char_counts.most_common() if k >= max(1, min_frequency)]
    return MergePlan(family=family, merges=merges, new_chars=new_chars,
                     stats={"words": sum(words.values()), "distinct_words": len(words), "units": len(units),
                            "raw_merges": len(merges)})
