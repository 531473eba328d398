"""Tokenizer statistics on a text file: characters and bytes per token, byte-fallback and unknowns."""

from __future__ import annotations

import json
from typing import Optional

from xlt.tokenizer.merges import BYTE_LEVEL, BYTE_TOKEN_RE, detect_family, is_whole_text, read_tokenizer_json


def load_fast_tokenizer(spec: str):
    """(tokenizers.Tokenizer, family) for a model/tokenizer spec, read from its tokenizer.json."""
    from tokenizers import Tokenizer

    from xlt.config import XltError

    tj = read_tokenizer_json(spec)
    try:
        family = detect_family(tj)
    except XltError:
        family = (tj.get("model") or {}).get("type", "?")  # stats work for any fast tokenizer
    return Tokenizer.from_str(json.dumps(tj)), family


def tokenizer_stats(tok, texts: list[str], family: Optional[str] = None, name: str = "") -> dict:
    """Compression and fallback figures of ``tok`` (a ``tokenizers.Tokenizer``) over ``texts``.

    ``byte_fallback_share``: tokens that are ``<0xNN>`` byte pieces (SentencePiece-style), or for
    byte-level BPE, tokens that are not complete UTF-8 characters (the same failure: a character
    the vocabulary has no token for). ``unk_share``: tokens equal to the unknown token.
    """
    texts = [t for t in texts if t]
    encs = tok.encode_batch(texts, add_special_tokens=False)
    n_tok = sum(len(e.ids) for e in encs)
    chars = sum(len(t) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    unk = getattr(tok.model, "unk_token", None)
    unk_id = tok.token_to_id(unk) if unk else None
    fallback = unk_n = 0
    cache: dict[str, bool] = {}
    for e in encs:
        for t, i in zip(e.tokens, e.ids):
            if unk_id is not None and i == unk_id:
                unk_n += 1
            if t not in cache:
                cache[t] = bool(BYTE_TOKEN_RE.match(t)) if family != BYTE_LEVEL else not is_whole_text(t, BYTE_LEVEL)
            fallback += cache[t]
    n = max(1, n_tok)
    return {"tokenizer": name, "family": family, "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "chars": chars, "tokens": n_tok, "chars_per_token": round(chars / n, 4),
            "bytes_per_token": round(nbytes / n, 4), "tokens_per_1k_chars": round(1000 * n_tok / max(1, chars), 2),
            "byte_fallback_share": round(fallback / n, 4), "unk_share": round(unk_n / n, 4)}


def plot_stats(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows) + 2), 3.5))
    ax.bar([r["tokenizer"] for r in rows], [r["chars_per_token"] for r in rows], color="#4477aa")
    ax.set_ylabel("characters per token")
    for i, r in enumerate(rows):
        ax.text(i, r["chars_per_token"], f"{r['chars_per_token']:.2f}", ha="center", va="bottom")
    plt.xticks(rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    cols = ["tokenizer", "chars_per_token", "bytes_per_token", "tokens_per_1k_chars", "byte_fallback_share", "unk_share"]
    heads = ["tokenizer", "chars/tok", "bytes/tok", "tok/1K chars", "byte-fallback", "unk"]
    cells = [[str(r[c]) for c in cols] for r in rows]
    w = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    line = lambda vals: "  ".join(v.ljust(w[i]) if i == 0 else v.rjust(w[i]) for i, v in enumerate(vals))  # noqa: E731
    return "\n".join([line(heads)] + [line(c) for c in cells])
