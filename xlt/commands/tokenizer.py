"""`xlt tokenizer extend` and `xlt tokenizer stats`: argparse sub-commands (wired by xlt.cli)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from xlt.config import EMBEDDED_MODEL, TokenizerArguments, XltError

EVAL_EVERY = 10  # every 10th document of the corpus is held out for the report


def add_tokenizer_commands(subparsers) -> None:  # noqa: ANN001 - argparse's private _SubParsersAction
    p = subparsers.add_parser("tokenizer", help="Extend / swap a tokenizer with Japanese vocabulary, or measure one.")
    sub = p.add_subparsers(dest="tokenizer_command", required=True)

    e = sub.add_parser("extend", help="Learn Japanese merges, resize and initialise the model, save both.")
    e.add_argument("--model", default=EMBEDDED_MODEL, help="Model spec: hub id, directory or 'smollm2-135m'.")
    e.add_argument("--corpus", nargs="+", required=True, metavar="SPEC",
                   help="Files (jsonl/txt/parquet) or embedded corpora (hironsan, chatterbot-ja, chatterbot-en).")
    e.add_argument("--text-field", default="text", help="Field holding the text in jsonl / parquet files.")
    e.add_argument("--new-tokens", type=int, required=True,
                   help="New tokens to add (extend), or the new vocabulary size (swap).")
    e.add_argument("--init", default="subword_mean",
                   help="New rows: subword_mean (default), merge_tree, mean, random or distill.")
    e.add_argument("--output-init", default="same",
                   help="New rows of an untied head: same (default), first_subtoken, char_weighted_mean or "
                        "calibrated_first_subtoken.")
    e.add_argument("--untie", action="store_true", help="Untie a tied model first (the head gets its own copy).")
    e.add_argument("--distill-steps", type=int, default=TokenizerArguments.distill_steps,
                   help="--init distill: Adam steps over the new input rows.")
    e.add_argument("--output", required=True, help="Directory for the resized model, tokenizer and report.")
    e.add_argument("--mode", default="extend", choices=["extend", "swap"])
    e.add_argument("--min-frequency", type=int, default=2)
    e.add_argument("--max-token-chars", type=int, default=16)
    e.add_argument("--max-chars", type=int, default=5_000_000, help="Corpus characters used for training (cap).")
    e.add_argument("--nfkc", action="store_true", help="NFKC-normalise the training corpus.")
    e.add_argument("--mecab", action="store_true", help="Do not learn merges across MeCab word boundaries.")
    e.add_argument("--pad-multiple", type=int, default=64, help="Pad the embedding rows to a multiple of this.")
    e.add_argument("--eval-en", default="chatterbot-en", metavar="SPEC",
                   help="English held-out text for the report (file or embedded corpus; 'none' to skip).")
    e.add_argument("--trust-remote-code", action="store_true")
    e.set_defaults(func=cmd_extend)

    s = sub.add_parser("stats", help="Characters / bytes per token, byte-fallback and unknown shares.")
    s.add_argument("--tokenizer", nargs="+", required=True, metavar="T", help="Model / tokenizer specs.")
    s.add_argument("--data", required=True, help="A jsonl / txt / parquet file, or an embedded corpus name.")
    s.add_argument("--text-field", default="text")
    s.add_argument("--plot", metavar="PNG", help="Write a bar chart of characters per token.")
    s.add_argument("--json", action="store_true", help="Print a JSON list instead of a table.")
    s.set_defaults(func=cmd_stats)


def read_spec(spec: str, text_field: str = "text") -> list[str]:
    """Documents of a file path or an embedded corpus name."""
    from xlt.data.sources import read_documents
    from xlt.embedded import EMBEDDED_CORPORA, embedded_documents

    if os.path.exists(spec):
        return read_documents(spec, text_field, key=spec)
    if spec in EMBEDDED_CORPORA:
        return embedded_documents(spec)
    raise XltError(f"corpus: {spec} is neither a file nor an embedded corpus ({', '.join(sorted(EMBEDDED_CORPORA))})")


def cmd_extend(args: argparse.Namespace) -> int:
    from xlt.tokenizer.extend import build_tokenizer_stage, check_corpus, check_output_dir, check_tokenizer_inputs
    from xlt.tokenizer.merges import japanese_share

    tok_args = TokenizerArguments(tokenizer_mode=args.mode, new_tokens=args.new_tokens, tokenizer_max_chars=args.max_chars,
                                  min_frequency=args.min_frequency, max_token_chars=args.max_token_chars,
                                  tokenizer_nfkc=args.nfkc, mecab=args.mecab, pad_vocab_multiple=args.pad_multiple,
                                  embedding_init=args.init, output_embedding_init=args.output_init,
                                  untie_embeddings=args.untie, distill_steps=args.distill_steps)
    # Everything cheap first: arguments, tokenizer type, output dir, corpus; the model loads last.
    check_tokenizer_inputs(args.model, tok_args)
    check_output_dir(args.output, args.model)
    docs = [d for spec in args.corpus for d in read_spec(spec, args.text_field) if d.strip()]
    check_corpus(docs)
    train = [d for i, d in enumerate(docs) if i % EVAL_EVERY != EVAL_EVERY - 1]
    held = [d for i, d in enumerate(docs) if i % EVAL_EVERY == EVAL_EVERY - 1]
    eval_texts = {"ja": [d for d in held if japanese_share([d]) >= 0.2]}
    en_held = [d for d in held if japanese_share([d]) < 0.2]
    if args.eval_en and args.eval_en != "none":
        try:
            en_held = en_held + read_spec(args.eval_en)[:500]
        except XltError:
            pass  # the embedded English corpus is optional; the report then has what the corpus held
    if en_held:
        eval_texts["en"] = en_held
    report = build_tokenizer_stage(args.model, tok_args, train, eval_texts, args.output,
                                   trust_remote_code=args.trust_remote_code)
    cpt = report["chars_per_token"]
    print(f"{report['mode']}: {report['new_tokens']} new tokens ({report['unreachable']} unreachable), vocab "
          f"{report['vocab_size']['base']} -> {report['vocab_size']['extended']}, init {report['init']}, "
          f"{report['seconds']:.1f}s")
    for lang, v in cpt.items():
        if v["base"] is not None:
            print(f"  {lang}: {v['base']:.3f} -> {v['extended']:.3f} chars/token ({v['extended'] / v['base']:.2f}x)")
    print(f"  wrote {args.output} (report: {os.path.join(args.output, 'tokenizer_report.json')})")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from xlt.tokenizer.stats import format_table, load_fast_tokenizer, plot_stats, tokenizer_stats

    texts = [t for t in read_spec(args.data, args.text_field) if t]
    if not texts:
        raise XltError(f"data: {args.data} holds no text")
    loaded = [(spec, *load_fast_tokenizer(spec)) for spec in args.tokenizer]  # all checked before any work
    rows = [tokenizer_stats(tok, texts, family, name=spec) for spec, tok, family in loaded]
    if args.plot:
        plot_stats(rows, args.plot)
    if args.json:
        json.dump(rows, sys.stdout, ensure_ascii=False)
        print()
    else:
        print(format_table(rows))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0
