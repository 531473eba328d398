"""Benchmark: extend SmolLM2's tokenizer with 4K / 8K / 16K Japanese tokens (merges), versus
``add_tokens`` with the same token list.

Trained on 90% of ja_wiki_paragraphs.jsonl, measured on the other 10% (every 10th paragraph) and on
the whole shared English text. Reports chars/token, time to extend, English ids changed and encode
speed. Usage: python bench/tokenizer.py [--sizes 4000 8000 16000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DATA = os.environ.get("XLT_SHARED_DATA", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))


def _encode_speed(fn, texts: list[str], repeat: int = 3) -> float:
    """Characters per second of the fastest of ``repeat`` passes."""
    chars = sum(len(t) for t in texts)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(texts)
        best = min(best, time.perf_counter() - t0)
    return chars / best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4000, 8000, 16000])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from xlt.tokenizer.extend import chars_per_token, extend_tokenizer_json
    from xlt.tokenizer.merges import is_whole_text, read_tokenizer_json

    with open(os.path.join(DATA, "ja_wiki_paragraphs.jsonl"), encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f if line.strip()]
    train = [d for i, d in enumerate(docs) if i % 10 != 9]
    held = [d for i, d in enumerate(docs) if i % 10 == 9]
    with open(os.path.join(DATA, "en_tinyshakespeare.txt"), encoding="utf-8") as f:
        en = f.read()
    en_docs = [b for b in en.split("\n\n") if b]

    base_tj = read_tokenizer_json(args.model)
    base = Tokenizer.from_str(json.dumps(base_tj))
    base_en = base.encode(en, add_special_tokens=False).ids
    base_hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(base_tj)))
    result = {"train_chars": sum(map(len, train)), "heldout_chars": sum(map(len, held)),
              "base": {"ja_chars_per_token": chars_per_token(base, held), "en_chars_per_token": chars_per_token(base, en_docs),
                       "encode_chars_per_s": round(_encode_speed(lambda t: base_hf(t)["input_ids"], held + en_docs[:2000]))},
              "sizes": []}
    for n in args.sizes:
        t0 = time.perf_counter()
        ext = extend_tokenizer_json(base_tj, train, n)
        seconds = time.perf_counter() - t0
        tok = ext.tokenizer()
        merged_hf = PreTrainedTokenizerFast(tokenizer_object=tok)
        en_ids = tok.encode(en, add_special_tokens=False).ids
        # add_tokens with the same list: only whole-text tokens can be added as strings at all.
        strings = [tok.id_to_token(i) for i in ext.new_ids]
        texts = [tok.decode([i]) for i, s in zip(ext.new_ids, strings) if is_whole_text(s, ext.family)]
        added = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(base_tj)))
        t1 = time.perf_counter()
        added.add_tokens(texts)
        add_seconds = time.perf_counter() - t1
        add_ids = added(held, add_special_tokens=False)["input_ids"]
        add_en = added(en, add_special_tokens=False)["input_ids"]
        add_cpt = sum(map(len, held)) / sum(map(len, add_ids))
        add_rt = sum(added.decode(ids) == d for ids, d in zip(add_ids, held)) / len(held)
        row = {
            "new_tokens": len(ext.new_ids), "unreachable": ext.unreachable, "seconds": round(seconds, 2),
            "merges": {"ja_chars_per_token": chars_per_token(tok, held), "en_chars_per_token": chars_per_token(tok, en_docs),
                       "en_ids_changed": sum(a != b for a, b in zip(en_ids, base_en)) + abs(len(en_ids) - len(base_en)),
                       "round_trip": sum(tok.decode(tok.encode(d).ids) == d for d in held) / len(held),
                       "encode_chars_per_s": round(_encode_speed(lambda t: merged_hf(t)["input_ids"], held + en_docs[:2000]))},  # noqa: B023 (called at once)
            "add_tokens": {"tokens_added": len(texts), "seconds": round(add_seconds, 2),
                           "ja_chars_per_token": round(add_cpt, 4),
                           "en_chars_per_token": round(sum(map(len, en_docs)) / sum(map(len, added(en_docs, add_special_tokens=False)["input_ids"])), 4),
                           "en_ids_changed": sum(a != b for a, b in zip(add_en, base_en)) + abs(len(add_en) - len(base_en)),
                           "round_trip": add_rt,
                           "encode_chars_per_s": round(_encode_speed(lambda t: added(t)["input_ids"], held + en_docs[:2000]))},  # noqa: B023 (called at once)
        }
        result["sizes"].append(row)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    b = result["base"]
    print(f"train {result['train_chars']} chars, held out {result['heldout_chars']} chars; base JA "
          f"{b['ja_chars_per_token']:.3f} chars/token, EN {b['en_chars_per_token']:.3f}, encode {b['encode_chars_per_s'] / 1e6:.2f} M chars/s")
    print(f"{'new':>6} {'method':>10} {'JA c/t':>7} {'x base':>7} {'EN c/t':>7} {'EN ids chg':>10} {'round trip':>10} "
          f"{'enc M c/s':>9} {'speed x':>7} {'secs':>6}")
    for r in result["sizes"]:
        for name in ("merges", "add_tokens"):
            m = r[name]
            secs = r["seconds"] if name == "merges" else m["seconds"]
            print(f"{r['new_tokens']:>6} {name:>10} {m['ja_chars_per_token']:>7.3f} {m['ja_chars_per_token'] / b['ja_chars_per_token']:>7.2f} "
                  f"{m['en_chars_per_token']:>7.3f} {m['en_ids_changed']:>10} {m['round_trip']:>10.2f} "
                  f"{m['encode_chars_per_s'] / 1e6:>9.2f} {m['encode_chars_per_s'] / b['encode_chars_per_s']:>7.2f} {secs:>6.2f}")
        print(f"{'':>6} ({r['unreachable']} unreachable; add_tokens could take {r['add_tokens']['tokens_added']} of the tokens: the rest are not whole characters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
