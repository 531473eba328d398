"""Benchmark: xlt's tokenize + mix + pack against HF's ``datasets.map(tokenize)`` + ``group_texts``.

Both pipelines process the same shared text (Japanese Wikipedia paragraphs + tiny Shakespeare)
once, with the same tokenizer, in the same process. Reported for each: wall time, throughput,
dropped tokens and the non-pad share of the emitted rows.

* HF baseline: the ``run_clm.py`` recipe: ``Dataset.from_dict`` -> ``map(tokenize, batched)`` ->
  ``map(group_texts, batched)`` (concatenate, cut into ``block_size`` rows, drop each 1000-document
  batch's remainder). Documents attend to each other inside a row.
* xlt: ``build_pretrain_stream`` at the corpus's natural Japanese share (so one pass of the rows
  covers the corpus exactly once), iterated for ``ceil(tokens / seq_len)`` rows into torch tensors.
  Dropped and pad tokens are *measured*: every row slot is checked against an independent
  tokenisation of the document the stream says it came from, and the first pass of every
  document must be found complete in the rows.

    python bench/data_pipeline.py [--seq-len 2048] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from itertools import chain

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHARED = os.environ.get("XLT_SHARED_DATA", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))
JA = os.path.join(SHARED, "ja_wiki_paragraphs.jsonl")
EN = os.path.join(SHARED, "en_tinyshakespeare.txt")


def run_group_texts(docs: list[str], tokenizer, block_size: int) -> dict:
    """HF's standard causal-LM preprocessing (transformers examples/pytorch/language-modeling/run_clm.py)."""
    import datasets

    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    raw = datasets.Dataset.from_dict({"text": docs})

    def tokenize_function(examples):
        return tokenizer(examples["text"])

    tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {k: [t[i: i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    grouped = grouped_ds = tokenized.map(group_texts, batched=True)
    grouped_ds.set_format("torch")
    n_rows = len(grouped)
    for _ in grouped_ds:  # materialise the rows as tensors, like a DataLoader would
        pass
    seconds = time.perf_counter() - t0
    tokens_in = sum(len(x) for x in tokenized["input_ids"])
    tokens_out = n_rows * block_size
    return {"seconds": seconds, "tokens_in": tokens_in, "rows": n_rows, "tokens_out": tokens_out,
            "dropped_tokens": tokens_in - tokens_out, "pad_tokens": 0, "nonpad_fraction": 1.0 if tokens_out else 0.0,
            "cross_document_attention": True}


def run_xlt(ja_docs: list[str], en_docs: list[str], tokenizer, seq_len: int, ja_tokens: int, en_tokens: int,
            check: bool) -> dict:
    import numpy as np
    import torch

    from xlt.config import DataArguments
    from xlt.data.stream import build_pretrain_stream

    corpus = ja_tokens + en_tokens
    n_rows = math.ceil(corpus / seq_len)
    args = DataArguments(
        sources=[{"name": "ja_wiki", "lang": "ja", "path": JA}, {"name": "tiny_shakespeare", "lang": "en", "path": EN}],
        seq_len=seq_len, ja_schedule="constant", ja_ratio_start=ja_tokens / corpus, clean_dedup=False)
    t0 = time.perf_counter()
    stream = build_pretrain_stream(args, tokenizer, total_tokens=n_rows * seq_len, rows_per_step=1)
    rows = []
    for row in stream.global_rows():
        # the same conversion PretrainStream.__iter__ does for the DataLoader
        batch = {"input_ids": torch.from_numpy(row.input_ids), "position_ids": torch.from_numpy(row.position_ids),
                 "labels": torch.from_numpy(row.labels)}
        rows.append((row, batch))
        if len(rows) >= n_rows:
            break
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "tokens_in": corpus, "rows": len(rows), "tokens_out": len(rows) * seq_len,
           "cross_document_attention": False}
    if not check:
        return out
    # Independent check of every slot: the tokens the stream claims are document tokens must be them.
    from xlt.data.mixture import permutation

    texts = {"ja_wiki": ja_docs, "tiny_shakespeare": en_docs}
    eos = tokenizer.eos_token_id
    cache: dict = {}
    verified, first_pass = 0, {name: {} for name in texts}
    for row, batch in rows:
        w = 0
        for name, where, off, n in row.segments:
            key = (name, where["epoch"], where["index"])
            if key not in cache:
                docs = texts[name]
                text = docs[permutation(args.stream_seed, name, where["epoch"], len(docs))[where["index"]]]
                cache[key] = np.array(tokenizer(text)["input_ids"] + [eos])
            doc = cache[key]
            if np.array_equal(batch["input_ids"][w:w + n].numpy(), doc[off:off + n]):
                verified += n
                if where["epoch"] == 0:
                    first_pass[name][where["index"]] = first_pass[name].get(where["index"], 0) + n
            w += n
    first_pass_tokens = sum(sum(v.values()) for v in first_pass.values())
    out.update({"verified_tokens": verified, "pad_tokens": out["tokens_out"] - verified,
                "nonpad_fraction": verified / out["tokens_out"], "dropped_tokens": corpus - first_pass_tokens})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each pipeline (best is reported)")
    ap.add_argument("--model", default="smollm2-135m", help="tokenizer of this model spec")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ns = ap.parse_args(argv)

    from xlt.data.sources import read_documents
    from xlt.models import load_tokenizer

    tokenizer = load_tokenizer(ns.model)
    ja_docs, en_docs = read_documents(JA), read_documents(EN)
    docs = ja_docs + en_docs
    # The natural Japanese share in xlt tokens (text tokens + EOS per document), so one pass of
    # xlt's rows is one pass of the corpus. The tokenizer adds no BOS here (checked by the stream).
    ja_tokens = sum(len(x) + 1 for x in tokenizer(ja_docs)["input_ids"])
    en_tokens = sum(len(x) + 1 for x in tokenizer(en_docs)["input_ids"])

    hf_runs, xlt_runs = [], []
    for i in range(ns.repeats):  # interleaved, so drift in machine load hits both
        hf_runs.append(run_group_texts(docs, tokenizer, ns.seq_len))
        xlt_runs.append(run_xlt(ja_docs, en_docs, tokenizer, ns.seq_len, ja_tokens, en_tokens, check=(i == 0)))
    hf = min(hf_runs, key=lambda r: r["seconds"])
    xlt = dict(min(xlt_runs, key=lambda r: r["seconds"]))
    for k in ("verified_tokens", "pad_tokens", "nonpad_fraction", "dropped_tokens"):
        xlt[k] = xlt_runs[0][k]
    chars = sum(len(d) for d in docs)
    result = {
        "seq_len": ns.seq_len, "documents": len(docs), "characters": chars, "repeats": ns.repeats,
        "xlt_seconds": round(xlt["seconds"], 4), "group_texts_seconds": round(hf["seconds"], 4),
        "xlt_tokens_per_s": round(xlt["tokens_in"] / xlt["seconds"], 1),
        "group_texts_tokens_per_s": round(hf["tokens_in"] / hf["seconds"], 1),
        "xlt_chars_per_s": round(chars / xlt["seconds"], 1), "group_texts_chars_per_s": round(chars / hf["seconds"], 1),
        # same text, one pass each: the ratio of wall times (xlt also adds one EOS per document)
        "speedup_vs_group_texts": round(hf["seconds"] / xlt["seconds"], 3),
        "xlt_tokens": xlt["tokens_in"], "group_texts_tokens": hf["tokens_in"],
        "xlt_dropped_tokens": xlt["dropped_tokens"], "group_texts_dropped_tokens": hf["dropped_tokens"],
        "xlt_pad_tokens": xlt["pad_tokens"], "group_texts_pad_tokens": hf["pad_tokens"],
        "xlt_nonpad_fraction": xlt["nonpad_fraction"], "group_texts_nonpad_fraction": hf["nonpad_fraction"],
        "xlt_rows": xlt["rows"], "group_texts_rows": hf["rows"],
        "xlt_cross_document_attention": False, "group_texts_cross_document_attention": True,
    }
    if ns.json:
        print(json.dumps(result))
        return 0
    print(f"same text: {len(docs):,} documents, {chars:,} characters; seq_len {ns.seq_len}; best of {ns.repeats}")
    print(f"{'pipeline':<28} {'seconds':>8} {'tokens/s':>11} {'tokens':>9} {'rows':>5} {'dropped':>8} {'non-pad':>8} "
          f"{'docs attend each other':>23}")
    for name, r, p in (("xlt tokenize+mix+pack", xlt, "xlt"), ("HF map+group_texts", hf, "group_texts")):
        print(f"{name:<28} {r['seconds']:>8.3f} {result[p + '_tokens_per_s']:>11,.0f} {r['tokens_in']:>9,} {r['rows']:>5} "
              f"{r['dropped_tokens']:>8,} {r['nonpad_fraction']:>8.2%} {str(r['cross_document_attention']):>23}")
    print(f"speedup vs group_texts: {result['speedup_vs_group_texts']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
