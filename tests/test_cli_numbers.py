"""Every numeric command-line option goes through the same value rules as recipe keys (xlt.validate)."""

from __future__ import annotations

import argparse

import pytest

from xlt import check
from xlt.cli import build_parser, main
from xlt.commands.sft import sft_preview_parser
from xlt.validate import RULES, cli_rule, numeric_options


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path of sub-command names, parser) for the parser and every sub-command below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if sub.prog.split()[-1] == name:  # aliases (e.g. --repo) point at the same parser: one visit
                    yield from _walk(sub, (*path, name))


def _required(parser: argparse.ArgumentParser) -> list[str]:
    return [a for act in parser._actions if act.required and act.option_strings
            for a in (act.option_strings[0], "1" if act.type in (int, float) else "x")]


def _bad_value(rule) -> float:
    ok, _ = rule
    return next(v for v in (-1, 0, 0.5, 1) if not ok(v))


def _cases():
    for path, parser in _walk(build_parser()):
        for p, action in numeric_options(parser):
            if p is parser:
                yield path, parser, action


CASES = list(_cases())


def test_every_numeric_option_of_every_command_has_a_rule():
    parsers = [build_parser(), check.build_parser(), sft_preview_parser()]
    options = [(p.prog, a.option_strings[0], a.dest) for parser in parsers for p, a in numeric_options(parser)]
    assert len(options) >= 25  # bpc, mc, harness, mt-bench, speed, chat, tokenizer, data, check, sft preview
    assert [o for o in options if cli_rule(o[2]) is None] == []
    # a recipe key keeps its recipe rule on the command line
    assert cli_rule("max_length") is RULES["max_length"] and cli_rule("new_tokens") is RULES["new_tokens"]


@pytest.mark.parametrize("path,parser,action", CASES, ids=[f"{' '.join(c[0])} {c[2].option_strings[0]}" for c in CASES])
def test_a_number_outside_its_rule_is_one_line_before_any_work(path, parser, action, capsys):
    value = _bad_value(cli_rule(action.dest))
    value = int(value) if action.type is int else value
    argv = [*path, *_required(parser), action.option_strings[0], str(value)]  # a later option wins
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"xlt: error: {action.option_strings[0]}={value} {cli_rule(action.dest)[1]}"]


def test_bpc_max_docs_minus_one_is_refused_not_one_document_scored(capsys):
    assert main(["evaluate", "bpc", "--model", "x", "--data", "y.jsonl", "--max-docs", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "xlt: error: --max-docs=-1 must be >= 1"


@pytest.mark.parametrize("argv,says", [(["--gpus", "-1"], "--gpus=-1 must be >= 0"),
                                       (["--gpu-memory-gb", "0"], "--gpu-memory-gb=0.0 must be > 0")])
def test_check_numbers_use_the_same_rules(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        check.main(["--config", "x.yaml", *argv])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_sft_preview_n_zero_is_one_line(capsys):
    assert main(["sft", "preview", "--config", "x.yaml", "--n", "0"]) == 2
    assert capsys.readouterr().err.strip() == "xlt: error: --n=0 must be >= 1"
