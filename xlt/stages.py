"""Recipe stages: ``--config FILE`` plus TrlParser-style overrides, parsed and run (``xlt cpt`` / ``sft`` /
``evaluate run``, ``recipes/*.py``, and the arms of ``xlt compare``).

The training and evaluation modules are imported when a stage runs, not with this module: ``xlt --help`` and the
light sub-commands start without loading torch and transformers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Optional

from xlt.config import (
    CptArguments,
    CptRecipe,
    DataArguments,
    EvalArguments,
    ModelArguments,
    OutputArguments,
    SftRecipe,
    TokenizerArguments,
    XltError,
    parse_recipe,
)


def recipe_stage(name: str) -> Callable[[Sequence[str]], int]:
    """A recipe stage: ``--config FILE`` plus TrlParser-style overrides."""

    def run(argv: Sequence[str]) -> int:
        if name == "cpt":
            from xlt.train.cpt import run_cpt

            r = CptRecipe.parse(argv)
            run_cpt(r.model, r.tokenizer, r.data, r.cpt, r.training, lora=r.lora)
        elif name == "extend_tokenizer":
            from xlt.train.cpt import run_tokenizer_stage

            report = run_tokenizer_stage(*parse_recipe([ModelArguments, TokenizerArguments, DataArguments,
                                                        CptArguments, OutputArguments], argv))
            cpt = report["chars_per_token"]
            print(f"new tokens {report['new_tokens']}; chars/token ja {cpt['ja']['base']:.3f} -> "
                  f"{cpt['ja']['extended']:.3f}, en {cpt['en']['base']:.3f} -> {cpt['en']['extended']:.3f}")
        elif name == "sft":
            from xlt.train.sft import learning_rate_given, run_sft

            r = SftRecipe.parse(argv)
            run_sft(r.sft, r.training, learning_rate_given=learning_rate_given(argv))
        elif name == "evaluate":
            from xlt.eval.suite import evaluate_run
            from xlt.report import format_table

            (args,) = parse_recipe([EvalArguments], argv)
            check_recipe_push(args)
            report = evaluate_run(args)
            print(format_table(report))
            if report.get("generation"):
                g = report["generation"]
                print(f"\nSFT model, {g['prompt']}\n→ {g['output']}")
            print(f"\nreport: {os.path.join(args.output_dir, 'report.json')}")
            recipe_push(args)
        return 0

    return run


def check_recipe_push(args: object) -> None:
    """Before an evaluate stage does any work: ``push_to_hub`` needs ``hub_repo_id`` and a token that may write."""
    if getattr(args, "push_to_hub", False):
        if not getattr(args, "hub_repo_id", None):
            raise XltError("push_to_hub: true needs hub_repo_id (ORG/NAME)")
        from xlt.hub import check_hub_access

        check_hub_access(args.hub_repo_id)


def recipe_push(args: object) -> None:
    """After an evaluate stage: push the run (model, card, REPORT.md) when ``push_to_hub`` is set."""
    if getattr(args, "push_to_hub", False):
        from xlt.hub import push_run

        print(f"pushed: {push_run(args.output_dir, args.hub_repo_id)}")


def prepare_data_stage(config: str, output_dir: Optional[str] = None, processes: int = 1) -> dict:
    """``xlt data prepare``: the recipe's checks first (sources, files, fields, output), then the tokenizer stage
    (reused when built), then the shards."""
    from xlt.data.prepare import check_writable, prepare_data
    from xlt.data.sources import heldout_texts, load_sources
    from xlt.models import load_tokenizer
    from xlt.train.checkpoint import claim_output_dir, fingerprint
    from xlt.train.cpt import prepare_model_dir

    r = CptRecipe.parse(["--config", config], device_free=True)
    model_args, tok_args, data_args, cpt_args, training_args = r.model, r.tokenizer, r.data, r.cpt, r.training
    sources = load_sources(data_args.sources, "sources")
    out = output_dir or os.path.join(training_args.output_dir, "data")
    if processes < 1:
        raise XltError(f"--processes must be at least 1 (got {processes})")
    # The tokenizer stage is built in the run directory, as xlt cpt builds it: the directory is claimed for it.
    claim_output_dir(training_args.output_dir, "prepare", fingerprint(model_args, tok_args, {"sources": data_args.sources}))
    check_writable(out)

    eval_sources = load_sources(data_args.eval_sources, "eval_sources") if data_args.eval_sources else None
    eval_texts = heldout_texts(sources, eval_sources, cpt_args.eval_max_docs)
    model_dir, _ = prepare_model_dir(model_args, tok_args, sources, eval_texts, training_args.output_dir)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=model_args.trust_remote_code)
    return prepare_data(sources, data_args, tokenizer, model_dir, out, processes,
                        trust_remote_code=model_args.trust_remote_code)
