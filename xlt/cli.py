"""The ``xlt`` command: thin sub-commands over the library.

    xlt cpt --config recipes/smollm2-135m-ja/cpt.yaml [--key value ...]
    xlt sft --config recipes/smollm2-135m-ja/sft.yaml [--key value ...]
    xlt sft preview --config RECIPE [--n N] [--json] [--key value ...]   (tokenizer only: what is trained)
    xlt evaluate run --config recipes/smollm2-135m-ja/evaluate.yaml
    xlt evaluate bpc --model DIR --data FILE [FILE ...] [--stride S] [--text-field text] [--max-docs N] --json
    xlt evaluate mc --model DIR --data FILE [--max-n N] --json
    xlt evaluate harness --model DIR --tasks jcommonsenseqa --data-dir DIR --json
    xlt evaluate mt-bench --model DIR (--judge MODEL | --judge-url URL --judge-model NAME) [--backend vllm] [--json]
    xlt tokenizer extend|stats ...      xlt data preview ...
    xlt chat --model RUN_DIR/sft [--max-new-tokens N]   (one instruction per line on stdin)
    xlt report RUN_DIR                  xlt push RUN_DIR --repo-id ORG/NAME [--private] [--dry-run --output DIR]
    xlt check --config RECIPE [--accelerate_config FILE] [--offline] [--gpus N --gpu-memory-gb G] [--json]
    xlt compare --config COMPARE.yaml [--output_dir DIR] [--json]

Any ``XltError`` is printed as one line (``xlt: error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional

from xlt import stages
from xlt.config import XltError
from xlt.validate import check_cli_numbers


def run_recipe(name: str, argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``recipes/{cpt,sft,evaluate}.py``: same behaviour as ``xlt NAME``.

    A launched process (``WORLD_SIZE`` > 1) leaves with its process group destroyed, after a barrier when the
    stage succeeded: a gloo group still alive at interpreter shutdown can abort the process (SIGABRT) after the
    model was saved, and the launcher then reports the whole run as failed."""
    try:
        rc = _guard(lambda: stages.recipe_stage(name)(list(sys.argv[1:] if argv is None else argv)))
    except BaseException:
        _end_process_group(ok=False)
        raise
    _end_process_group(ok=rc == 0)
    return rc


def _end_process_group(ok: bool) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if ok:  # every rank got here: nobody is left mid-collective when the connections close
            dist.barrier()
        dist.destroy_process_group()


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


def _evaluate_mt_bench(ns: argparse.Namespace) -> int:
    from xlt.eval.mt_bench_run import MtBenchOptions, run_mt_bench
    from xlt.eval.suite import print_json

    opts = MtBenchOptions(**{k: v for k, v in vars(ns).items() if k in MtBenchOptions.__dataclass_fields__})
    r = run_mt_bench(opts)
    if ns.json:
        print_json(r)
        return 0
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"MT-Bench score {fmt(r['score'])} (turn 1 {fmt(r['turn1'])}, turn 2 {fmt(r['turn2'])}) over "
          f"{r['n']} judgments, {r['unparsed']} without a rating")
    for name, score in r["categories"].items():
        print(f"  {name}: {fmt(score)}")
    return 0


def _add_mt_bench(ev: argparse._SubParsersAction) -> None:
    from xlt.eval.mt_bench_run import ANSWER_MAX_NEW_TOKENS, DEFAULT_OUTPUT, DEFAULT_QUESTIONS, JUDGE_MAX_TOKENS

    t = ev.add_parser("mt-bench", help="Japanese MT-Bench: two-turn answers graded 1-10 by a judge LLM (FastChat)")
    t.add_argument("--model", default=None, help="model that answers (an xlt sft/ folder answers in its training format)")
    t.add_argument("--questions", default=DEFAULT_QUESTIONS, help="FastChat question.jsonl (judge_prompts.jsonl and "
                   "reference_answer/gpt-4.jsonl are looked for next to it; default %(default)s)")
    t.add_argument("--judge-prompts", default=None, help="FastChat judge_prompts.jsonl")
    t.add_argument("--references", default=None, help="reference answers for math / reasoning / coding (gpt-4.jsonl)")
    t.add_argument("--categories", default=None, help="comma-separated categories (default all)")
    t.add_argument("--max-questions", type=int, default=None, help="first N questions (after --categories)")
    t.add_argument("--judge", default=None, help="local judge model spec (transformers, greedy)")
    t.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    t.add_argument("--judge-model", default=None, help="model name the endpoint serves (e.g. gpt-4)")
    t.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the endpoint's key")
    t.add_argument("--answers", default=None, help="grade these answers (FastChat model_answer jsonl), generate none")
    t.add_argument("--model-id", default=None, help="name of the answering model in the output files")
    t.add_argument("--output", default=DEFAULT_OUTPUT, help="folder for model_answer/, model_judgment/, result.json (default %(default)s)")
    t.add_argument("--max-new-tokens", type=int, default=ANSWER_MAX_NEW_TOKENS, help="longest answer per turn (default %(default)s, FastChat's)")
    t.add_argument("--judge-max-tokens", type=int, default=JUDGE_MAX_TOKENS, help="longest verdict (default %(default)s, FastChat's; smaller on CPU)")
    t.add_argument("--verdict-retries", type=int, default=2,
                   help="times a verdict without a rating is asked again (endpoints; a greedy local judge repeats itself)")
    t.add_argument("--backend", choices=("auto", "transformers", "vllm"), default="auto",
                   help="answer generation: vllm (its offline engine, on a GPU), transformers, or auto (default: "
                        "vllm when it is installed and a CUDA GPU is there)")
    t.add_argument("--trust-remote-code", action="store_true")
    t.add_argument("--json", action="store_true",
                   help='print {"score", "turn1", "turn2", "categories": {name: score}, "n", "unparsed"}')
    t.set_defaults(func=_evaluate_mt_bench)


def _chat(ns: argparse.Namespace) -> int:
    """``xlt chat --model DIR [--max-new-tokens N]``: reads instructions from stdin until an empty line / EOF."""
    from xlt.eval.chat import chat

    if ns.max_new_tokens <= 0:
        raise XltError(f"chat: --max-new-tokens={ns.max_new_tokens} must be > 0")
    if not os.path.isdir(ns.model):
        raise XltError(f"chat: --model {ns.model} is not a directory")
    chat(ns.model, ns.max_new_tokens)
    return 0


def _report(ns: argparse.Namespace) -> int:
    """``xlt report RUN_DIR`` or ``xlt report --output_dir DIR``: write RUN_DIR/REPORT.md + plots, print the table."""
    import json

    from xlt.report import build_report, format_table

    if ns.run_dir and ns.output_dir and os.path.abspath(ns.run_dir) != os.path.abspath(ns.output_dir):
        raise XltError(f"report: give RUN_DIR or --output_dir, not both ({ns.run_dir} vs {ns.output_dir})")
    run_dir = ns.run_dir or ns.output_dir
    if not run_dir:
        raise XltError("report: give the run directory (xlt report RUN_DIR)")
    path = os.path.join(run_dir, "report.json")
    if not os.path.isfile(path):
        raise XltError(f"{path} not found")
    with open(path, encoding="utf-8") as f:
        print(format_table(json.load(f)))
    print(f"\nreport: {build_report(run_dir)}")
    return 0


def _compare(ns: argparse.Namespace) -> int:
    from xlt.compare import main as compare_main

    return compare_main(ns.config, ns.output_dir, ns.json)


def _push(ns: argparse.Namespace) -> int:
    """``xlt push RUN_DIR --repo-id ORG/NAME`` (or the older ``--model DIR --repo ORG/NAME``)."""
    from xlt.hub import push, push_run

    if not ns.repo_id:
        raise XltError("push: --repo-id ORG/NAME is required")
    if ns.run_dir and ns.model:
        raise XltError("push: give RUN_DIR or --model, not both")
    if ns.run_dir:
        result = push_run(ns.run_dir, ns.repo_id, private=ns.private, dry_run=ns.dry_run, output=ns.output)
    elif ns.model:
        result = push(ns.model, ns.repo_id, report_path=ns.report, private=ns.private, dry_run=ns.dry_run,
                      output=ns.output)
    else:
        raise XltError("push: give the run directory (xlt push RUN_DIR --repo-id ORG/NAME)")
    print(f"dry run, nothing uploaded; the upload folder: {os.path.dirname(result) if ns.model else result}"
          if ns.dry_run else result)
    return 0


# --- xlt evaluate speed / xlt plan (generation speed, scaling planner) ---------------------------
def _evaluate_speed(ns: argparse.Namespace) -> int:
    from xlt.eval.speed import speed_json
    from xlt.eval.suite import print_json

    r = speed_json(ns.model, ns.prompts, ns.max_chars, ns.trust_remote_code)
    if ns.json:
        print_json(r)
        return 0
    for m in r["models"]:
        print(f"{m['model']}: {m['chars_per_second']:.1f} chars/s, {m['chars_per_token']:.3f} chars/token, "
              f"{m['tokens_per_second']:.1f} tokens/s ({m['chars']} chars, {m['tokens']} tokens, {m['seconds']:.2f}s)")
    if "speedup" in r:
        print(f"speed-up (second over first, chars/s): {r['speedup']:.2f}x")
    return 0


def _plan(ns: argparse.Namespace) -> int:
    from xlt.eval.suite import print_json
    from xlt.plan import format_plan, parse_number, plan

    num = {k: (None if getattr(ns, k) is None else parse_number(getattr(ns, k), "--" + k.replace("_", "-")))
           for k in ("gpus", "days", "mfu", "params", "ja_chars", "chars_per_token", "ja_share")}
    r = plan(num["gpus"], ns.gpu, num["days"], num["mfu"], params=num["params"], ja_chars=num["ja_chars"],
             chars_per_token=num["chars_per_token"], ja_share=num["ja_share"])
    print_json(r) if ns.json else print(format_plan(r))
    return 0


def _add_speed_and_plan(sub: argparse._SubParsersAction, ev: argparse._SubParsersAction) -> None:
    s = ev.add_parser("speed", help="Japanese characters per second and per token of one or two models")
    s.add_argument("--model", action="append", required=True, help="model spec; give twice to compare (B over A)")
    s.add_argument("--prompts", default=None, help="one prompt per line (.jsonl: field prompt or text); "
                                                   "default: 8 built-in Japanese prompts")
    s.add_argument("--max-chars", type=int, default=200, help="characters of output per prompt, for every model")
    s.add_argument("--trust-remote-code", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_evaluate_speed)

    # Numbers are parsed by xlt.plan.parse_number (accepts 1.7B, 2e12) so bad input is one line, exit 2.
    p = sub.add_parser("plan", help="compute budget -> Chinchilla-optimal size and tokens, Japanese data epochs")
    p.add_argument("--gpus", required=True)
    p.add_argument("--gpu", default="h100", help="h100, h100-sxm, h200 or a100 (dense bf16 peak)")
    p.add_argument("--days", required=True)
    p.add_argument("--mfu", required=True, help="model FLOPs utilisation, a fraction in (0, 1]")
    p.add_argument("--params", default=None, help="a fixed model size (e.g. 1.7B): tokens it can train on")
    p.add_argument("--ja-chars", default=None, help="characters of the Japanese corpus")
    p.add_argument("--chars-per-token", default="1.0", help="Japanese characters per token of the tokenizer")
    p.add_argument("--ja-share", default="1.0", help="fraction of the trained tokens that are Japanese")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plan)
# --- end xlt evaluate speed / xlt plan ------------------------------------------------------------


def _add_evaluate(sub: Any) -> None:
    """``xlt evaluate run | bpc | speed | plan | mc | harness | mt-bench``."""
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
    _add_speed_and_plan(sub, ev)
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
    _add_mt_bench(ev)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlt", description="Cross-lingual continued pretraining toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("cpt", "continued pretraining from a recipe"), ("sft", "instruction SFT from a recipe")):
        p = sub.add_parser(name, help=help_, add_help=False)
        p.set_defaults(recipe=name)
    sub.add_parser("check", help="preflight a recipe: keys, packages, launcher vs hardware, memory (xlt check -h)",
                   add_help=False)

    _add_evaluate(sub)

    c = sub.add_parser("chat", help="talk to an SFT model: one instruction per line, answer streamed (training format)")
    c.add_argument("--model", required=True, help="an sft/ folder written by xlt sft (with xlt_sft.json)")
    c.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    c.set_defaults(func=_chat)

    r = sub.add_parser("report", help="write RUN_DIR/REPORT.md with plots and print the table of report.json")
    r.add_argument("run_dir", nargs="?", default=None, help="the run directory")
    r.add_argument("--output_dir", default=None, help="the run directory (older spelling of RUN_DIR)")
    r.set_defaults(func=_report)

    p = sub.add_parser("push", help="push a run's model, tokenizer, REPORT.md and a model card to the Hub")
    p.add_argument("run_dir", nargs="?", default=None, help="the run directory (pushes its sft/, else cpt/)")
    p.add_argument("--repo-id", "--repo", dest="repo_id", default=None, help="hub repo id, e.g. my-org/smollm2-135m-ja")
    p.add_argument("--model", default=None, help="older form: the model directory (e.g. OUTPUT_DIR/sft)")
    p.add_argument("--report", default=None, help="older form: the run's report.json")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="upload nothing; stage the upload folder (see --output)")
    p.add_argument("--output", default=None, help="with --dry-run: write the upload folder here (new or empty)")
    p.set_defaults(func=_push)

    c = sub.add_parser("compare", help="arms of one cpt recipe at equal training FLOPs, scored per character")
    c.add_argument("--config", required=True, help="comparison file (recipe, compute, arms, heldout, eval)")
    c.add_argument("--output_dir", "--output-dir", default=None, help="default: the file's output_dir, else runs/compare")
    c.add_argument("--json", action="store_true", help="print DIR/compare.json's list (progress goes to stderr)")
    c.set_defaults(func=_compare)

    from xlt.commands.data import add_data_commands
    from xlt.commands.tokenizer import add_tokenizer_commands

    add_tokenizer_commands(sub)
    add_data_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["sft", "preview"]:
        from xlt.commands.sft import sft_preview

        return _guard(lambda: sft_preview(argv[2:]))
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

    def run() -> int:
        check_cli_numbers(parser, ns)
        return ns.func(ns)

    return _guard(run)


if __name__ == "__main__":
    sys.exit(main())
