"""Benchmark: seconds and peak memory of learning Japanese merges at the recipes' corpus scale.

The recipes learn merges from up to 500M characters (``tokenizer_max_chars``); that much real text is
not available offline, so the corpus is synthesised by a character n-gram model (order 3 by default)
trained on ja_wiki_paragraphs.jsonl: documents whose lengths are drawn from the real paragraph
lengths, deterministic by seed. Each size runs in its own child process; ``peak_rss_mb`` is that
child's RSS high-water mark (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) at the end of learning, so
it includes the synthetic text held as a Python list (``text_rss_mb`` is the high-water mark just
before learning starts). ``seconds`` times ``xlt.tokenizer.merges.learn_merges`` only.

``--mecab`` learns with MeCab word boundaries (the shipped recipes' ``mecab: true``); ``--processes N``
segments and counts in N processes (the MeCab path; default: the library's automatic choice). With
``--mecab`` each size also reports ``count_seconds`` (segment + count) and ``train_seconds`` (the BPE
trainer), and the result a projection for 500M characters on 16 processes (see ``main``).

Usage: python bench/tokenizer_scale.py [--sizes 1000000 10000000 50000000] [--model smollm2-135m|spm]
       [--merges 8000] [--order 3] [--seed 0] [--mecab] [--processes N] [--profile] [--json]
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

# The shared data lies beside the checkout (``../shared/data``); from a worktree one level further up.
DATA = os.environ.get("XLT_SHARED_DATA") or next(
    (p for p in (os.path.join(ROOT, "..", "shared", "data"), os.path.join(ROOT, "..", "..", "shared", "data"))
     if os.path.isdir(p)), os.path.join(ROOT, "..", "shared", "data"))
TARGET = 500_000_000  # the recipes' tokenizer_max_chars


def _real_docs() -> list[str]:
    with open(os.path.join(DATA, "ja_wiki_paragraphs.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def synth_corpus(chars: int, seed: int = 0, order: int = 3) -> list[str]:
    """About ``chars`` characters of documents from a character ``order``-gram model of the real paragraphs.

    Deterministic for (chars, seed, order). A document ends at its drawn length (or where the model
    reaches a context only seen at the end of a real paragraph).
    """
    docs = _real_docs()
    k = order - 1
    nexts: dict[str, Counter] = defaultdict(Counter)
    for d in docs:
        for i in range(len(d) - k):
            nexts[d[i:i + k]][d[i + k]] += 1
    table = {}
    for ctx, cnt in nexts.items():
        items = sorted(cnt.items())
        cum, s = [], 0
        for _, c in items:
            s += c
            cum.append(s)
        table[ctx] = ([ch for ch, _ in items], cum, s)
    starts = [d[:k] for d in docs if len(d) > k]
    lengths = [len(d) for d in docs]
    rng = random.Random(seed)
    out, total = [], 0
    while total < chars:
        n = min(rng.choice(lengths), chars - total)
        buf = list(rng.choice(starts))[:n]
        ctx = "".join(buf[-k:]) if k else ""
        while len(buf) < n:
            entry = table.get(ctx)
            if entry is None:
                break
            population, cum, s = entry
            ch = population[bisect.bisect_right(cum, rng.random() * s)]
            buf.append(ch)
            ctx = (ctx + ch)[1:] if k else ""
        doc = "".join(buf)
        out.append(doc)
        total += len(doc)
    return out


def _spm_tokenizer_json(workdir: str, vocab_size: int = 4000) -> str:
    """A SentencePiece BPE with byte fallback (the Llama-2 / Mistral layout) trained on the shared English text."""
    import sentencepiece as spm

    from xlt.tokenizer.spm import tokenizer_json_from_spm

    with open(os.path.join(DATA, "en_tinyshakespeare.txt"), encoding="utf-8") as f:
        lines = [ln for ln in f.read().split("\n") if ln.strip()][:20000]
    prefix = os.path.join(workdir, "spm")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
                                   allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
                                   normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    path = os.path.join(workdir, "tokenizer.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tokenizer_json_from_spm(prefix + ".model"), f, ensure_ascii=False)
    return path


def _child(args: argparse.Namespace) -> int:
    """One size in this process: generate, learn, print one JSON line."""
    from tokenizers import Tokenizer

    from xlt.tokenizer.merges import detect_family, learn_merges, read_tokenizer_json

    tj = read_tokenizer_json(args.model)
    family = detect_family(tj)
    base = Tokenizer.from_str(json.dumps(tj))
    t0 = time.perf_counter()
    texts = synth_corpus(args.child, seed=args.seed, order=args.order)
    gen_seconds = time.perf_counter() - t0
    text_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kw = {"mecab": args.mecab}
    if args.processes is not None:
        kw["num_proc"] = args.processes
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    plan = learn_merges(base, family, texts, n_merges=args.merges, **kw)
    seconds = time.perf_counter() - t0
    if prof is not None:
        import io
        import pstats

        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
        sys.stderr.write(buf.getvalue())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    timings = getattr(plan, "timings", {}) or {}
    print(json.dumps({"chars": sum(map(len, texts)), "docs": len(texts), "seconds": round(seconds, 2),
                      "peak_rss_mb": round(peak, 1), "text_rss_mb": round(text_rss, 1),
                      "worker_peak_rss_mb": round(children, 1), "merges": len(plan.merges),
                      "distinct_words": plan.stats.get("distinct_words"), "words": plan.stats.get("words"),
                      "generate_seconds": round(gen_seconds, 2),
                      **{k: round(v, 2) if isinstance(v, float) else v for k, v in timings.items()}}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 50_000_000],
                    help="Corpus sizes in characters.")
    ap.add_argument("--model", default="smollm2-135m",
                    help="Model spec or tokenizer.json; 'spm' = a SentencePiece BPE with byte fallback (Llama-2 layout).")
    ap.add_argument("--merges", type=int, default=8000, help="Merges to learn.")
    ap.add_argument("--order", type=int, default=3, help="Order of the character n-gram model.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mecab", action="store_true", help="Cut at MeCab word boundaries (the recipes' mecab: true).")
    ap.add_argument("--processes", type=int, default=None,
                    help="Processes that segment and count (default: the library's automatic choice).")
    ap.add_argument("--profile", action="store_true", help="cProfile the learning; top functions to stderr.")
    ap.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        return _child(args)

    with tempfile.TemporaryDirectory() as tmp:
        model = _spm_tokenizer_json(tmp) if args.model == "spm" else args.model
        rows = []
        for n in args.sizes:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", str(n), "--model", model,
                   "--merges", str(args.merges), "--order", str(args.order), "--seed", str(args.seed)]
            cmd += ["--mecab"] if args.mecab else []
            cmd += ["--processes", str(args.processes)] if args.processes is not None else []
            cmd += ["--profile"] if args.profile else []
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="true"))
            if proc.returncode != 0 or args.profile:
                sys.stderr.write(proc.stderr)
            if proc.returncode != 0:
                return proc.returncode
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    last = rows[-1]
    cps = last["chars"] / max(last["seconds"], 1e-9)
    result = {"model": args.model, "merges_requested": args.merges, "order": args.order, "seed": args.seed,
              "mecab": args.mecab, "processes": args.processes,
              "sizes": rows, "chars_per_second": round(cps), "projected_seconds_500m": round(TARGET / cps, 1),
              "peak_rss": "ru_maxrss of a child process per size (includes the text list; text_rss_mb: before learning)"}
    if args.mecab and last.get("count_seconds"):
        # Counting (MeCab + cut) is split over processes, the trainer is not: per-process throughput is the
        # largest size's chars / (count_seconds * processes) (an underestimate where the cores are shared);
        # the trainer's seconds are scaled linearly in characters (an upper bound: its merge loop grows with
        # distinct words, which grow slower than the corpus).
        per_proc = last["chars"] / (last["count_seconds"] * last["num_proc"])
        train = last["train_seconds"] * TARGET / last["chars"]
        result.update(per_process_chars_per_second=round(per_proc), projected_train_seconds_500m=round(train, 1),
                      projected_seconds_500m_16proc=round(TARGET / (16 * per_proc) + train, 1))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model {args.model}, {args.merges} merges, {args.order}-gram synthetic Japanese (seed {args.seed})")
    print(f"{'chars':>12} {'docs':>8} {'distinct':>9} {'merges':>7} {'secs':>8} {'M chars/s':>9} {'peak MB':>8} {'text MB':>8}")
    for r in rows:
        print(f"{r['chars']:>12} {r['docs']:>8} {r['distinct_words']:>9} {r['merges']:>7} {r['seconds']:>8.2f} "
              f"{r['chars'] / max(r['seconds'], 1e-9) / 1e6:>9.3f} {r['peak_rss_mb']:>8.1f} {r['text_rss_mb']:>8.1f}")
    print(f"projected for {TARGET // 1_000_000}M characters at {cps / 1e6:.3f} M chars/s: {TARGET / cps:.0f} s")
    if "projected_seconds_500m_16proc" in result:
        print(f"MeCab counting {result['per_process_chars_per_second'] / 1e6:.3f} M chars/s per process; projected for "
              f"{TARGET // 1_000_000}M characters with 16 processes: {result['projected_seconds_500m_16proc']:.0f} s "
              f"(trainer {result['projected_train_seconds_500m']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
