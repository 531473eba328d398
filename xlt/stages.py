"""Recipe stages: ``--config FILE`` plus TrlParser-style overrides, parsed and run (``xlt cpt`` / ``sft`` /
``evaluate run``, ``recipes/*.py``, and the arms of ``xlt compare``).

The training and evaluation modules are imported when a stage runs, not with this module: ``xlt --help`` and the
light sub-commands start without loading torch and transformers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from xlt.config import (
    CptArguments,
    DataArguments,
    EvalArguments,
    ModelArguments,
    OutputArguments,
    SftArguments,
    TokenizerArguments,
    XltError,
    cpt_recipe_types,
    parse_recipe,
)


def recipe_stage(name: str) -> Callable[[Sequence[str]], int]:
    """A recipe stage: ``--config FILE`` plus TrlParser-style overrides."""

    def run(argv: Sequence[str]) -> int:
        if name == "cpt":
            from xlt.train.cpt import run_cpt

            *parsed, lora, training_args = parse_recipe(cpt_recipe_types(), argv)
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

            from xlt.train.sft import learning_rate_given, run_sft

            run_sft(*parse_recipe([SftArguments, SFTConfig], argv), learning_rate_given=learning_rate_given(argv))
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
