"""The ``xlt`` command: thin sub-commands over the library.

    xlt cpt --config recipes/smollm2-135m-ja/cpt.yaml [--key value ...]
    xlt sft --config recipes/smollm2-135m-ja/sft.yaml [--key value ...]
    xlt evaluate run --config recipes/smollm2-135m-ja/evaluate.yaml
    xlt evaluate bpc --model DIR --data FILE [FILE ...] [--stride S] [--text-field text] [--max-docs N] --json
    xlt evaluate mc --model DIR --data FILE [--max-n N] --json
    xlt evaluate harness --model DIR --tasks jcommonsenseqa --data-dir DIR --json
    xlt tokenizer extend|stats ...      xlt data preview ...
    xlt report --output_dir DIR         xlt push --model DIR --repo ORG/NAME
    xlt check --config RECIPE [--accelerate_config FILE] [--offline] [--gpus N --gpu-memory-gb G] [--json]

Any ``XltError`` is printed as one line (``xlt: error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Optional

from xlt.config import XltError


def _recipe_stage(name: str) -> Callable[[Sequence[str]], int]:
    """A recipe stage: ``--config FILE`` plus TrlParser-style overrides."""

    def run(argv: Sequence[str]) -> int:
        from xlt.config import (
            CptArguments,
            DataArguments,
            EvalArguments,
            ModelArguments,
            OutputArguments,
            SftArguments,
            TokenizerArguments,
            parse_recipe,
        )

        if name == "cpt":
            from transformers import TrainingArguments

            from xlt.train.cpt import run_cpt
            from xlt.train.lora import LoraSettings

            *parsed, lora, training_args = parse_recipe([ModelArguments, TokenizerArguments, DataArguments,
                                                         CptArguments, LoraSettings, TrainingArguments], argv)
            run_cpt(*parsed, training_args, lora=lora)
        elif name == "extend_tokenizer":
            from xlt.train.cpt import run_tokenizer_stage

            report = run_tokenizer_stage(*parse_recipe([ModelArguments, TokenizerArguments, DataArguments,
                                                        CptArguments, OutputArguments], argv))
            cpt = report["chars_per_token"]
            print(f"new tokens {report['new_tokens']}; chars/token ja {cpt['ja']['base']:.3f} -> "
                  f"{cpt['ja']['extended']:.3f}, en {cpt['en']['base']:.3f} -> {cpt['en']['extended']:.3f}")
        elif name == "sft":
            from trl import SFTConfig

            from xlt.train.sft import run_sft

            run_sft(*parse_recipe([SftArguments, SFTConfig], argv))
        elif name == "evaluate":
            from xlt.eval.suite import evaluate_run
            from xlt.report import format_table

            (args,) = parse_recipe([EvalArguments], argv)
            report = evaluate_run(args)
            print(format_table(report))
            if report.get("generation"):
                g = report["generation"]
                print(f"\nSFT model, {g['prompt']}\n→ {g['output']}")
            print(f"\nreport: {os.path.join(args.output_dir, 'report.json')}")
        return 0

    return run


def run_recipe(name: str, argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``recipes/{cpt,sft,evaluate}.py``: same behaviour as ``xlt NAME``."""
    return _guard(lambda: _recipe_stage(name)(list(sys.argv[1:] if argv is None else argv)))


def _guard(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except XltError as e:
        print(f"xlt: error: {e}", file=sys.stderr)
        return 2


def _evaluate_bpc(ns: argparse.Namespace) -> int:
    from xlt.eval.suite import bpc_json, print_json

    data = ns.data[0] if len(ns.data) == 1 else ns.data
    r = bpc_json(ns.model, data, ns.text_field, ns.max_docs, ns.max_length, ns.trust_remote_code,
                 stride=ns.stride, batch_size=ns.batch_size)
    if ns.json:
        print_json(r)
        return 0
    for path, f in r.get("files", {}).items():
        print(f"{path}: bits/char {f['bits_per_char']:.4f}, bits/byte {f['bits_per_byte']:.4f} "
              f"over {f['chars']:,} characters ({f['tokens']:,} tokens)")
    print(f"bits/char {r['bits_per_char']:.4f}, bits/byte {r['bits_per_byte']:.4f} "
          f"over {r['chars']:,} characters ({r['tokens']:,} tokens)")
    return 0


def _evaluate_mc(ns: argparse.Namespace) -> int:
    from xlt.eval.mc import mc_json
    from xlt.eval.suite import print_json

    r = mc_json(ns.model, ns.data, max_n=ns.max_n, batch_size=ns.batch_size, max_length=ns.max_length,
                trust_remote_code=ns.trust_remote_code)
    if ns.json:
        print_json(r)
    else:
        lo, hi = r["ci95"]
        print(f"accuracy {r['accuracy']:.4f} (95% CI {lo:.4f}-{hi:.4f}), length-normalised "
              f"{r['accuracy_norm']:.4f} over {r['n']} questions")
    return 0


def _evaluate_harness(ns: argparse.Namespace) -> int:
    from xlt.eval.harness import run_harness
    from xlt.eval.suite import print_json

    r = run_harness(ns.model, ns.tasks.split(","), ns.data_dir, limit=ns.limit, batch_size=ns.batch_size,
                    num_fewshot=ns.num_fewshot, device=ns.device)
    if ns.json:
        print_json(r)
    else:
        for task, metrics in r["results"].items():
            print(task + ": " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def _report(ns: argparse.Namespace) -> int:
    import json

    from xlt.report import format_table

    path = os.path.join(ns.output_dir, "report.json")
    if not os.path.isfile(path):
        raise XltError(f"{path} not found")
    with open(path, encoding="utf-8") as f:
        print(format_table(json.load(f)))
    return 0


def _push(ns: argparse.Namespace) -> int:
    from xlt.hub import push

    url = push(ns.model, ns.repo, report_path=ns.report, private=ns.private, dry_run=ns.dry_run)
    print(url)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlt", description="Cross-lingual continued pretraining toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("cpt", "continued pretraining from a recipe"), ("sft", "instruction SFT from a recipe")):
        p = sub.add_parser(name, help=help_, add_help=False)
        p.set_defaults(recipe=name)
    sub.add_parser("check", help="preflight a recipe: keys, packages, launcher vs hardware, memory (xlt check -h)",
                   add_help=False)

    ev = sub.add_parser("evaluate", help="evaluation").add_subparsers(dest="what", required=True)
    ev.add_parser("run", help="evaluate a run directory from a recipe", add_help=False).set_defaults(recipe="evaluate")
    b = ev.add_parser("bpc", help="bits per character / byte of a model on one or more files (sliding window)")
    b.add_argument("--model", required=True, help="model spec: hub id, directory or embedded alias")
    b.add_argument("--data", required=True, nargs="+", action="extend",
                   help="jsonl (field --text-field) or .txt (blank-line-separated documents); several give "
                        "per-file results under \"files\"")
    b.add_argument("--text-field", default="text")
    b.add_argument("--max-docs", type=int, default=None)
    b.add_argument("--max-length", type=int, default=1024, help="window length in tokens")
    b.add_argument("--stride", type=int, default=None,
                   help="tokens a window advances (default max-length // 2); every scored token sees at least "
                        "max-length - stride tokens of context")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--trust-remote-code", action="store_true")
    b.add_argument("--json", action="store_true", help='print {"bits_per_char", "bits_per_byte", "chars", "tokens"}')
    b.set_defaults(func=_evaluate_bpc)
    m = ev.add_parser("mc", help="Japanese multiple choice (JCommonsenseQA layout) by choice log-likelihood")
    m.add_argument("--model", required=True, help="model spec: hub id, directory or embedded alias")
    m.add_argument("--data", required=True, help="jsonl with question, choice0..choice4, label")
    m.add_argument("--max-n", type=int, default=None, help="first N usable questions only")
    m.add_argument("--max-length", type=int, default=1024, help="longest prompt + choice in tokens")
    m.add_argument("--batch-size", type=int, default=16)
    m.add_argument("--trust-remote-code", action="store_true")
    m.add_argument("--json", action="store_true", help='print {"accuracy", "accuracy_norm", "n", "ci95", ...}')
    m.set_defaults(func=_evaluate_mc)
    h = ev.add_parser("harness", help="lm-eval japanese_leaderboard tasks on local files (pip install 'xlt[eval]')")
    h.add_argument("--model", required=True, help="model directory")
    h.add_argument("--tasks", default="jcommonsenseqa", help="comma-separated: " + "jcommonsenseqa")
    h.add_argument("--data-dir", required=True, help="folder with the tasks' local files (e.g. jcommonsenseqa_valid.jsonl)")
    h.add_argument("--limit", type=int, default=None, help="first N documents per task")
    h.add_argument("--num-fewshot", type=int, default=None, help="default: the task's (0 without a train file)")
    h.add_argument("--batch-size", type=int, default=8)
    h.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    h.add_argument("--json", action="store_true")
    h.set_defaults(func=_evaluate_harness)

    r = sub.add_parser("report", help="print the table of a run's report.json")
    r.add_argument("--output_dir", required=True)
    r.set_defaults(func=_report)

    p = sub.add_parser("push", help="push a model, its tokenizer and a model card to the Hub")
    p.add_argument("--model", required=True, help="model directory (e.g. OUTPUT_DIR/sft)")
    p.add_argument("--repo", required=True, help="hub repo id, e.g. my-org/smollm2-135m-ja")
    p.add_argument("--report", default=None, help="report.json to summarise in the model card")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="write the model card, upload nothing")
    p.set_defaults(func=_push)

    from xlt.data.preview import add_data_commands
    from xlt.tokenizer.cli import add_tokenizer_commands

    add_tokenizer_commands(sub)
    add_data_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Recipe stages take TrlParser arguments, which argparse here must not interpret.
    if argv and argv[0] in ("cpt", "sft"):
        return run_recipe(argv[0], argv[1:])
    if argv and argv[0] == "check":  # its own parser: unknown --key value arguments are recipe overrides
        from xlt.check import main as check_main

        return check_main(argv[1:])
    if argv[:2] == ["evaluate", "run"]:
        return run_recipe("evaluate", argv[2:])
    parser = build_parser()
    ns = parser.parse_args(argv)
    return _guard(lambda: ns.func(ns))


if __name__ == "__main__":
    sys.exit(main())
