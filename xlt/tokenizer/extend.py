"""Extend a BPE tokenizer with Japanese merges, appended after all original merges.

Guarantees (tested):

* every original token keeps its id and string, added / special tokens included; new ids come after
  the largest old id (added tokens included), so they never collide with an added token;
* new merges are appended after every original merge, so they fire only where the original merges
  are exhausted: a segmentation that uses no new merge is unchanged;
* no new merge joins two pure-ASCII pieces, so ASCII text (English, code) keeps its exact ids;
* every new token is reachable. The precise rule: the BPE model run on the token's own vocabulary
  string yields exactly that token; and where the token is whole text (complete UTF-8 characters,
  and for SentencePiece-style tokens, one that starts with ``▁``), ``encode(decode([id])) == [id]``.
  A byte-level token that ends inside a multi-byte character has no text of its own, so only the
  first part applies to it; a SentencePiece-style piece without ``▁`` only occurs inside a word, so
  likewise. Tokens failing the rule are dropped (with every merge that needs them) and the
  selection is redone until none fails.

Id layout (why added tokens are written into the model vocabulary): ``tokenizers`` ignores the ``id``
stored with each entry of ``added_tokens`` when it loads a tokenizer.json. An added token whose content
the model vocabulary holds gets that entry's id; any other gets ``len(model vocab)`` (the first) or the
largest added id + 1 (the rest). Llama-3 (128,000 pieces, then 256 specials at 128000..128255) and
Qwen2/2.5/3 (151,643 pieces, specials from 151643) rely on the vocabulary having exactly as many entries
as the first special token's id; appending N pieces would renumber every special token to N places
later, onto new tokens. So :func:`pin_added_tokens` writes each added token that the vocabulary lacks
into it, at the id the base tokenizer gives it (the layout GPT-2, Llama-2, Mistral and Gemma already
ship). Encoding is unchanged: added tokens are split out of the text before the model runs, and no
merge yields their strings.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from xlt.config import TokenizerArguments, XltError
from xlt.tokenizer.merges import (
    BYTE_LEVEL,
    METASPACE,
    MergePlan,
    detect_family,
    is_ascii_token,
    japanese_share,
    learn_merges,
    merges_as_pairs,
    read_tokenizer_json,
    token_text,
    unreachable_tokens,
)

MODES = ("extend", "swap")
MIN_JA_SHARE = 0.05  # a "Japanese" corpus with under 5% Japanese script is almost surely the wrong file


@dataclass
class Extension:
    """The extended tokenizer.json and what was added."""

    family: str
    tokenizer_json: dict
    new_ids: list[int]
    new_merges: int
    unreachable: int
    base_size: int
    stats: dict = field(default_factory=dict)

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_str(json.dumps(self.tokenizer_json))


def pin_added_tokens(tj: dict, ids: dict[str, int]) -> int:
    """Write every added token the model vocabulary lacks into it at ``ids[content]`` (in place).

    Guarantee: once the vocabulary grows, ``tokenizers`` still gives each added token the id in
    ``ids`` (see the module docstring). The ``id`` fields of ``added_tokens`` are set to match.
    Returns how many entries were written.
    """
    vocab = tj["model"]["vocab"]
    n = 0
    for t in tj.get("added_tokens") or []:
        i = ids[t["content"]]
        t["id"] = i
        if t["content"] not in vocab:
            vocab[t["content"]] = i
            n += 1
    return n


def _select(base_tj: dict, base_ids: dict[str, int], plan: MergePlan, n_new: int, max_token_chars: int,
            banned: set[str]) -> tuple[dict, list[int], int]:
    """Pick merges in priority order until ``n_new`` new tokens; return (tokenizer.json, new ids, merges).

    ``base_ids``: the base tokenizer's ids as loaded (:func:`loaded_ids`). New ids start after the
    largest of them; added tokens are pinned to theirs (:func:`pin_added_tokens`).
    """
    family = plan.family
    tj = copy.deepcopy(base_tj)
    pin_added_tokens(tj, base_ids)
    model = tj["model"]
    vocab: dict[str, int] = model["vocab"]
    base_merges = set(merges_as_pairs(model))
    next_id = max(base_ids.values()) + 1
    new_ids: list[int] = []
    accepted: list[tuple[str, str]] = []
    seen = set(base_merges)
    chars = [c for c in plan.new_chars if c not in banned and not c.isascii() and c != "\ufffd"]
    char_ok = set(chars)

    def add(s: str) -> None:
        nonlocal next_id
        vocab[s] = next_id
        new_ids.append(next_id)
        next_id += 1

    # SentencePiece-style: the most frequent missing characters first, up to half the budget (each
    # occurrence of a kana/kanji saves 2 byte-fallback tokens, usually more than one merge saves).
    for c in chars[: n_new // 2] if family == METASPACE else []:
        add(c)
    for a, b in plan.merges:
        if len(new_ids) >= n_new:
            break
        parts_ok = True
        for p in (a, b):
            if p not in vocab:
                if family == METASPACE and p in char_ok and len(new_ids) < n_new - 1:
                    add(p)
                else:
                    parts_ok = False
        if not parts_ok or (a, b) in seen:
            continue
        r = a + b
        if (r in banned or len(token_text(r, family)) > max_token_chars or is_ascii_token(r, family)
                or (family == METASPACE and "▁" in r[1:])):
            continue
        accepted.append((a, b))
        seen.add((a, b))
        if r not in vocab:
            add(r)
    if family == METASPACE:  # spend what is left of the budget on further characters
        for c in chars:
            if len(new_ids) >= n_new:
                break
            if c not in vocab:
                add(c)
    as_strings = bool(model.get("merges")) and isinstance(model["merges"][0], str)
    model["merges"] = list(model.get("merges") or []) + [f"{a} {b}" if as_strings else [a, b] for a, b in accepted]
    return tj, new_ids, len(accepted)


def moved_tokens(base_ids: dict[str, int], tok) -> list[tuple[str, int]]:
    """(string, old id) of every base token (added ones included) whose id ``tok`` does not keep."""
    return [(s, i) for s, i in base_ids.items() if tok.token_to_id(s) != i or tok.id_to_token(i) != s]


def extend_tokenizer_json(base_tj: dict, texts: list[str], n_new: int, min_frequency: int = 2,
                          max_token_chars: int = 16, nfkc: bool = False, mecab: bool = False,
                          num_proc: Optional[int] = None) -> Extension:
    """Learn ``n_new`` new tokens from ``texts`` and append them (and their merges) to ``base_tj``."""
    from tokenizers import Tokenizer

    family = detect_family(base_tj)
    base = Tokenizer.from_str(json.dumps(base_tj))
    t0 = time.time()
    # Ask the trainer for a surplus: filters (ASCII, length, reachability, merges onto old strings) drop some.
    plan = learn_merges(base, family, texts, n_merges=int(n_new * 1.5) + 200, min_frequency=min_frequency,
                        max_token_chars=max_token_chars, nfkc=nfkc, mecab=mecab, num_proc=num_proc)
    t_train = time.time() - t0
    banned: set[str] = set()
    base_ids = base.get_vocab(with_added_tokens=True)
    for _ in range(10):
        tj, new_ids, n_merges = _select(base_tj, base_ids, plan, n_new, max_token_chars, banned)
        tok = Tokenizer.from_str(json.dumps(tj))
        moved = moved_tokens(base_ids, tok)
        if moved:
            s, i = moved[0]
            raise XltError(f"tokenizer: extending would move {len(moved)} existing tokens (first {s!r}: id {i} -> "
                           f"{tok.token_to_id(s)}); this tokenizer.json layout is not supported")
        bad = unreachable_tokens(tok, family, new_ids)
        if not bad:
            break
        banned.update(tok.id_to_token(i) for i in bad)
    stats = dict(plan.stats, train_seconds=round(t_train, 2), select_rounds=_ + 1, dropped_unreachable=len(banned))
    return Extension(family=family, tokenizer_json=tj, new_ids=new_ids, new_merges=n_merges, unreachable=len(bad),
                     base_size=max(base_ids.values()) + 1, stats=stats)


# ---------------------------------------------------------------------------------------------
# Checks before any model is loaded
# ---------------------------------------------------------------------------------------------
def check_tokenizer_inputs(model_spec: str, tok_args: TokenizerArguments, read_tokenizer: bool = True) -> None:
    """Cheap checks (no model load): mode, N, init method, tokenizer type and tokenizer.json.

    ``read_tokenizer=False`` stops before reading tokenizer.json (``xlt check --offline`` on a hub model).
    """
    mode = tok_args.tokenizer_mode
    if mode == "none":
        return
    if mode not in MODES:
        raise XltError(f"tokenizer_mode={mode!r}: expected none, extend or swap")
    if tok_args.new_tokens is None or tok_args.new_tokens <= 0:
        what = "new tokens" if mode == "extend" else "vocabulary size"
        raise XltError(f"new_tokens={tok_args.new_tokens}: the number of {what} must be > 0")
    tok_args.check_init_keys()
    if tok_args.min_frequency < 1:
        raise XltError(f"min_frequency={tok_args.min_frequency} must be >= 1")
    if tok_args.max_token_chars < 2:
        raise XltError(f"max_token_chars={tok_args.max_token_chars} must be >= 2")
    if tok_args.pad_vocab_multiple < 1:
        raise XltError(f"pad_vocab_multiple={tok_args.pad_vocab_multiple} must be >= 1")
    if tok_args.tokenizer_num_proc is not None and tok_args.tokenizer_num_proc < 1:
        raise XltError(f"tokenizer_num_proc={tok_args.tokenizer_num_proc} must be >= 1")
    if tok_args.mecab:
        try:
            import fugashi  # noqa: F401
            import unidic_lite  # noqa: F401
        except ImportError:
            raise XltError("mecab: needs the PyPI packages fugashi and unidic-lite: pip install fugashi unidic-lite") from None
    if not read_tokenizer:
        return
    if tok_args.output_embedding_init != "same" and not tok_args.untie_embeddings and config_ties_embeddings(model_spec):
        raise XltError(f"output_embedding_init={tok_args.output_embedding_init}: {model_spec} ties its input and output "
                       f"embeddings; set untie_embeddings: true (or output_embedding_init: same)")
    tj = read_tokenizer_json(model_spec)
    family = detect_family(tj)
    if mode == "swap" and family != BYTE_LEVEL:
        raise XltError("tokenizer_mode=swap: supported for byte-level BPE tokenizers only; "
                       "use tokenizer_mode=extend for SentencePiece-style tokenizers")


def config_ties_embeddings(model_spec: str) -> bool:
    """Whether the model's config ties input and output embeddings, read from config.json (no weights load).

    An unreadable config counts as untied: the same check runs again on the loaded model
    (``resize_and_init``), still before any row changes.
    """
    from xlt.models import resolve_model

    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(resolve_model(model_spec))
        return bool(getattr(cfg.get_text_config(), "tie_word_embeddings", False))
    except Exception:  # noqa: BLE001 - custom code or an unreachable hub: decided on the loaded model instead
        return False


def check_output_dir(output_dir: str, model_spec: str) -> None:
    """Refuse to write over a directory that holds some other model."""
    if not os.path.isdir(output_dir):
        if os.path.exists(output_dir):
            raise XltError(f"output: {output_dir} exists and is not a directory")
        return
    has_model = any(os.path.isfile(os.path.join(output_dir, f)) for f in ("config.json", "model.safetensors",
                                                                         "model.safetensors.index.json"))
    report = os.path.join(output_dir, "tokenizer_report.json")
    if has_model and not os.path.isfile(report):
        raise XltError(f"output: {output_dir} already holds another model; choose an empty directory")


def check_corpus(texts: list[str]) -> None:
    if not texts or not any(t.strip() for t in texts):
        raise XltError("tokenizer corpus: no text")
    share = japanese_share(texts)
    if share < MIN_JA_SHARE:
        raise XltError(f"tokenizer corpus: only {share:.1%} of its characters are Japanese; "
                       f"new merges are learned from Japanese text (give a Japanese corpus)")


# ---------------------------------------------------------------------------------------------
# The stage: tokenizer + model, saved, with a report
# ---------------------------------------------------------------------------------------------
def chars_per_token(tok, texts: list[str]) -> Optional[float]:
    texts = [t for t in texts if t]
    if not texts:
        return None
    n = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return round(sum(len(t) for t in texts) / max(1, n), 4)


def _cap_chars(texts: list[str], max_chars: int) -> list[str]:
    out, n = [], 0
    for t in texts:
        if n >= max_chars:
            break
        out.append(t[: max_chars - n])
        n += len(out[-1])
    return out


def _copy_tokenizer_files(src_dir: str, dst_dir: str) -> None:
    """Carry tokenizer_config.json, special tokens and chat template; never the slow model."""
    for f in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
              "generation_config.json"):
        p = os.path.join(src_dir, f)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(dst_dir, f))


def _samples(old, new, texts: list[str], k: int = 3) -> list[dict]:
    out = []
    for t in [t for t in texts if t][:k]:
        t = t[:80]
        out.append({"text": t, "base": [old.decode([i]) for i in old.encode(t, add_special_tokens=False).ids],
                    "extended": [new.decode([i]) for i in new.encode(t, add_special_tokens=False).ids]})
    return out


def merge_ids(tj: dict, ids: dict[str, int], skip: int = 0) -> list[tuple[int, int, int]]:
    """``(result id, part a id, part b id)`` of the merges of ``tj`` after the first ``skip``, in merge order."""
    out = []
    for a, b in merges_as_pairs(tj["model"])[skip:]:
        if a + b in ids and a in ids and b in ids:
            out.append((ids[a + b], ids[a], ids[b]))
    return out


def init_new_rows(model, tok_args: TokenizerArguments, new_size: int, keep: dict[int, int],  # noqa: ANN001
                  pieces: dict[int, list[int]], base, new_tok, new_tj: dict, family: str, texts: list[str],  # noqa: ANN001
                  skip_merges: int = 0) -> dict:
    """Resize ``model`` and initialise its new rows as ``tok_args`` says (embedding_init,
    output_embedding_init, untie_embeddings; distill_steps for distill). Returns the summary, with
    ``init_flops`` (0 unless the method runs the model)."""
    from xlt.tokenizer.embeddings import align_weights, continuation_stats, distill_new_rows, resize_and_init
    from xlt.tokenizer.merges import token_bytes

    method = tok_args.embedding_init
    merges = merge_ids(new_tj, new_tok.get_vocab(with_added_tokens=True), skip_merges) if method == "merge_tree" else None
    piece_bytes = None
    if tok_args.output_embedding_init == "char_weighted_mean":
        piece_bytes = {i: [token_bytes(base.id_to_token(p), family) for p in ps] for i, ps in pieces.items()}
    new_ids = sorted(i for i in pieces if i not in keep)
    calibration = None
    if tok_args.output_embedding_init == "calibrated_first_subtoken":  # measured on the base model, before resizing
        calibration = continuation_stats(model, texts, new_tok, pieces, new_ids)
    align = align_weights(texts, base, new_tok, new_ids) if method == "align" else None
    summary = resize_and_init(model, new_size, keep, pieces, method=method, output_method=tok_args.output_embedding_init,
                              untie_first=tok_args.untie_embeddings, merges=merges, piece_bytes=piece_bytes,
                              calibration=calibration, align=align)
    if align is not None:
        summary["aligned_rows"] = len(align)  # the rest fell back to subword_mean
    if calibration is not None:
        summary.update({k: v for k, v in calibration.items() if k not in ("logprob", "direction")})
    if method == "distill":
        distilled = distill_new_rows(model, texts, new_tok, pieces, new_ids, steps=tok_args.distill_steps)
        distilled["init_flops"] += summary.get("init_flops", 0)  # both the calibration's and the distillation's
        summary.update(distilled)
    return summary


def _new_tokenizer(base_tj: dict, base: Any, texts: list[str], tok_args: TokenizerArguments) -> tuple:
    """The extended (merges appended) or swapped (trained anew) tokenizer: ``(tokenizer.json, Tokenizer, kept
    rows {new id: old id}, new tokens {id: string}, unreachable count, report extras)``."""
    if tok_args.tokenizer_mode == "extend":
        ext = extend_tokenizer_json(base_tj, texts, tok_args.new_tokens, min_frequency=tok_args.min_frequency,
                                    max_token_chars=tok_args.max_token_chars, nfkc=tok_args.tokenizer_nfkc,
                                    mecab=tok_args.mecab, num_proc=tok_args.tokenizer_num_proc)
        new_tok = ext.tokenizer()
        keep = {i: i for i in base.get_vocab(with_added_tokens=True).values()}  # every old id, specials included
        return (ext.tokenizer_json, new_tok, keep, {i: new_tok.id_to_token(i) for i in ext.new_ids}, ext.unreachable,
                {"new_merges": ext.new_merges, **ext.stats})
    from xlt.tokenizer.swap import train_swap_tokenizer

    sw = train_swap_tokenizer(base_tj, texts, tok_args.new_tokens, min_frequency=tok_args.min_frequency,
                              max_token_chars=tok_args.max_token_chars, nfkc=tok_args.tokenizer_nfkc)
    new_tj = sw.tokenizer_json
    new_tokens = {i: s for s, i in new_tj["model"]["vocab"].items() if i not in sw.shared}
    return new_tj, sw.tokenizer(), sw.shared, new_tokens, sw.unreachable, {"shared_tokens": len(sw.shared)}


def _save(model: Any, model_spec: str, new_tj: dict, mode: str, output_dir: str) -> None:
    """The resized model (safetensors) and the new tokenizer, with the base's other tokenizer files."""
    from xlt.models import resolve_model

    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    src = resolve_model(model_spec)
    if os.path.isdir(src):
        _copy_tokenizer_files(src, output_dir)
    with open(os.path.join(output_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(new_tj, f, ensure_ascii=False)
    if mode == "swap":
        from xlt.tokenizer.swap import fix_tokenizer_config

        fix_tokenizer_config(output_dir, new_tj)


def build_tokenizer_stage(model_spec: str, tok_args: TokenizerArguments, corpus_texts: list[str],
                          eval_texts: dict[str, list[str]], output_dir: str,
                          trust_remote_code: bool = False) -> dict:
    """Train merges (extend) or a new tokenizer (swap) per tok_args.tokenizer_mode, resize + init the model,
    save model + tokenizer to output_dir (safetensors, loadable by AutoModelForCausalLM/AutoTokenizer), write
    output_dir/tokenizer_report.json and return that report dict."""
    from tokenizers import Tokenizer

    from xlt.models import load_model
    from xlt.tokenizer.embeddings import padded_size

    t0 = time.time()
    check_tokenizer_inputs(model_spec, tok_args)
    if tok_args.tokenizer_mode == "none":
        raise XltError("tokenizer_mode=none: nothing to build")
    check_output_dir(output_dir, model_spec)
    texts = _cap_chars([t for t in corpus_texts if t], tok_args.tokenizer_max_chars)
    check_corpus(texts)

    base_tj = read_tokenizer_json(model_spec)
    base = Tokenizer.from_str(json.dumps(base_tj))
    mode = tok_args.tokenizer_mode
    new_tj, new_tok, keep, new_tokens, unreachable, extra = _new_tokenizer(base_tj, base, texts, tok_args)
    n_new = len(new_tokens)
    family = detect_family(new_tj)

    model = load_model(model_spec, torch_dtype="float32", trust_remote_code=trust_remote_code)
    old_rows = int(model.get_input_embeddings().weight.shape[0])
    new_size = padded_size(max(new_tok.get_vocab(with_added_tokens=True).values()) + 1, tok_args.pad_vocab_multiple)
    if mode == "extend":
        # An extension never drops rows (Qwen's embedding has padding rows past its last token), and an old
        # id with no row in the old model (a tokenizer larger than its embedding) has nothing to copy.
        new_size = max(new_size, old_rows)
        keep = {i: o for i, o in keep.items() if o < old_rows}
    pieces = {i: [t.id for t in base.model.tokenize(s)] for i, s in new_tokens.items()}
    summary = init_new_rows(model, tok_args, new_size, keep, pieces, base, new_tok, new_tj, family,
                            texts, skip_merges=len(base_tj["model"].get("merges") or []) if mode == "extend" else 0)

    _save(model, model_spec, new_tj, mode, output_dir)

    report = {
        "mode": mode,
        "family": family,
        "init": tok_args.embedding_init,
        "base_model": model_spec,
        "new_tokens": n_new,
        "unreachable": unreachable,
        "vocab_size": {"base": base.get_vocab_size(with_added_tokens=True),
                       "extended": new_tok.get_vocab_size(with_added_tokens=True)},
        "embedding_rows": {"base": old_rows, "extended": new_size},
        "embeddings": summary,
        "init_flops": summary.get("init_flops", 0),
        "chars_per_token": {lang: {"base": chars_per_token(base, ts), "extended": chars_per_token(new_tok, ts)}
                            for lang, ts in eval_texts.items()},
        "corpus_chars": sum(len(t) for t in texts),
        "seconds": 0.0,
        "samples": _samples(base, new_tok, list(eval_texts.get("ja") or texts)),
        **extra,
    }
    report["seconds"] = round(time.time() - t0, 2)
    with open(os.path.join(output_dir, "tokenizer_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=2)
    return report
