"""``xlt sft preview``: the first N SFT training examples as trained (tokenizer only, no model weights)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from xlt.config import SftRecipe, XltError
from xlt.data.sft import load_sft_data
from xlt.data.sft_format import IGNORE_INDEX, check_prompt_format, install_chatml, tokenize_example
from xlt.models import check_model_spec, load_tokenizer
from xlt.validate import check_cli_numbers


def sft_preview_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xlt sft preview", allow_abbrev=False, description="The first N SFT training examples as "
                                "trained: text with the spans that carry loss (tokenizer only, no model weights).")
    p.add_argument("--n", type=int, default=3, help="examples to show")
    p.add_argument("--json", action="store_true",
                   help='print [{"text", "trained": [[start, end], ...], "tokens", "truncated"}, ...]')
    return p


def sft_preview(argv: Sequence[str]) -> int:
    """``xlt sft preview --config RECIPE [--n N] [--json]``; other ``--key value`` pairs override the recipe."""
    p = sft_preview_parser()
    ns, rest = p.parse_known_args(list(argv))
    check_cli_numbers(p, ns)
    if "--config" not in rest:
        raise XltError("sft preview: --config RECIPE is required")
    return preview_main(rest, n=ns.n, as_json=ns.json)


def _recipe(argv: Sequence[str]) -> tuple[Any, Any]:
    """(SftArguments, SFTConfig) of a recipe, parsed like the sft stage (LoRA keys accepted)."""
    r = SftRecipe.parse(list(argv), device_free=True)  # the tokenizer only: no device check
    return r.sft, r.training


def _preview_tokenizer(sft_args: Any, training_args: Any) -> Any:
    """The recipe's tokenizer (no weights), with ChatML installed when the recipe asks for it."""
    spec = sft_args.model or os.path.join(training_args.output_dir, "cpt")
    if not sft_args.model and not os.path.isdir(spec):
        raise XltError(f"model: no model given and {spec} does not exist (run continued pretraining first, "
                       "or pass --model)")
    check_model_spec(spec)
    tok = load_tokenizer(spec, trust_remote_code=getattr(training_args, "trust_remote_code", False),
                         revision=getattr(sft_args, "model_revision", None))
    chat_template = getattr(sft_args, "chat_template", None)
    if chat_template == "chatml":
        install_chatml(tok)
    elif chat_template is not None:
        raise XltError(f"chat_template={chat_template!r}: expected chatml (or leave it unset)")
    return tok


def preview_examples(argv: Sequence[str], n: int) -> list[dict]:
    """The first ``n`` training examples of a recipe (fully masked ones skipped, as training drops them).

    Reads the tokenizer only; the data come from ``xlt.data.sft.load_sft_data`` (no held-out split).
    """
    if n < 1:
        raise XltError(f"--n={n}: expected a positive number of examples")
    sft_args, training_args = _recipe(argv)
    check_prompt_format(sft_args.prompt_format)
    data = load_sft_data(sft_args.sft_datasets, eval_fraction=0.0)
    tok = _preview_tokenizer(sft_args, training_args)
    max_length = getattr(training_args, "max_length", None)
    out = []
    for ex in data.train:
        t = tokenize_example(ex["messages"], sft_args.prompt_format, tok, max_length)
        if all(label == IGNORE_INDEX for label in t.labels):
            continue
        out.append({"text": t.text, "trained": [list(s) for s in t.trained], "tokens": len(t.input_ids),
                    "truncated": t.truncated})
        if len(out) >= n:
            break
    return out


def highlight(text: str, spans: Sequence[Sequence[int]], color: bool) -> str:
    """``text`` with the trained spans in green (``color``) or between ``[[`` and ``]]``."""
    open_, close = ("\033[1;32m", "\033[0m") if color else ("[[", "]]")
    parts, pos = [], 0
    for s, e in spans:
        parts += [text[pos:s], open_, text[s:e], close]
        pos = e
    parts.append(text[pos:])
    return "".join(parts)


def preview_main(argv: Sequence[str], n: int = 3, as_json: bool = False) -> int:
    """``xlt sft preview``: JSON, or the texts with trained spans highlighted (axolotl's debug view)."""
    rows = preview_examples(argv, n)
    if as_json:
        print(json.dumps(rows, ensure_ascii=False, indent=1))
        return 0
    color = sys.stdout.isatty()
    legend = "\033[1;32mgreen\033[0m" if color else "[[...]]"
    print(f"{len(rows)} example(s); text in {legend} carries loss")
    for i, r in enumerate(rows):
        print(f"\n--- example {i}: {r['tokens']} tokens{', truncated' if r['truncated'] else ''} ---")
        print(highlight(r["text"], r["trained"], color))
    return 0
