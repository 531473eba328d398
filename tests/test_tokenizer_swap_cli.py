"""Swap mode, the stats function and the `xlt tokenizer` sub-commands."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from tok_fixtures import EN_TEXT, JA_WIKI, ROUND_TRIP, en_text, ja_split, smollm2_dir, tiny_model_dir
from tokenizers import Tokenizer

from conftest import shared_file
from xlt.commands.tokenizer import add_tokenizer_commands
from xlt.config import TokenizerArguments, XltError
from xlt.tokenizer.extend import build_tokenizer_stage
from xlt.tokenizer.stats import load_fast_tokenizer, tokenizer_stats


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xlt")
    add_tokenizer_commands(p.add_subparsers(dest="command"))
    return p


def _run(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    return a.func(a)


def test_swap_stage(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model_dir(tmp_path, smollm2_dir(), tied=False)
    old = AutoModelForCausalLM.from_pretrained(src)
    old_in, old_out = old.get_input_embeddings().weight.detach(), old.get_output_embeddings().weight.detach()
    train, held = ja_split()
    en = [b for b in en_text().split("\n\n")]
    out = str(tmp_path / "swap")
    rep = build_tokenizer_stage(src, TokenizerArguments(tokenizer_mode="swap", new_tokens=6000), train + en[:3000],
                                {"ja": held, "en": en[-300:]}, out)
    assert rep["mode"] == "swap" and rep["vocab_size"]["extended"] == 6000
    assert rep["chars_per_token"]["ja"]["extended"] > 2 * rep["chars_per_token"]["ja"]["base"]
    new = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    base = Tokenizer.from_file(os.path.join(src, "tokenizer.json"))
    for t in ROUND_TRIP + held[:10]:
        assert new.decode(new.encode(t, add_special_tokens=False).ids, skip_special_tokens=False) == t
    model = AutoModelForCausalLM.from_pretrained(out)
    w_in, w_out = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    assert w_in.shape[0] == 6016  # padded to 64
    shared = 0
    for s, i in new.get_vocab().items():  # shared strings keep their rows, on both sides
        j = base.token_to_id(s)
        if j is not None:
            shared += 1
            assert torch.equal(w_in[i], old_in[j]) and torch.equal(w_out[i], old_out[j])
    assert shared == rep["shared_tokens"] > 256
    assert new.token_to_id("<|im_end|>") == 2  # special tokens carried over
    hf = AutoTokenizer.from_pretrained(out)
    assert hf.eos_token == "<|im_end|>" and hf.convert_tokens_to_ids("<|im_end|>") == 2


def test_stats_function_and_command(tmp_path, capsys):
    shared_file(JA_WIKI.name)
    tok, fam = load_fast_tokenizer(smollm2_dir())
    _, held = ja_split()
    ja = tokenizer_stats(tok, held, fam, "s")
    en = tokenizer_stats(tok, [en_text()[:20000]], fam, "s")
    assert 0.4 < ja["chars_per_token"] < 0.8 < 3 < en["chars_per_token"]
    assert ja["byte_fallback_share"] > 0.5 and en["byte_fallback_share"] == 0 and ja["unk_share"] == 0
    assert abs(ja["tokens_per_1k_chars"] - 1000 / ja["chars_per_token"]) < 1
    png = tmp_path / "p.png"
    assert _run(["tokenizer", "stats", "--tokenizer", "smollm2-135m", smollm2_dir(), "--data", str(JA_WIKI),
                 "--json", "--plot", str(png)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["tokenizer"] for r in rows] == ["smollm2-135m", smollm2_dir()]
    assert rows[0]["chars_per_token"] == rows[1]["chars_per_token"] > 0.4
    assert png.stat().st_size > 1000
    assert _run(["tokenizer", "stats", "--tokenizer", "smollm2-135m", "--data", str(EN_TEXT)]) == 0
    assert "chars/tok" in capsys.readouterr().out


def test_extend_command(tmp_path, capsys):
    shared_file(JA_WIKI.name)
    src = tiny_model_dir(tmp_path, smollm2_dir(), tied=True)
    out = tmp_path / "ext"
    assert _run(["tokenizer", "extend", "--model", src, "--corpus", str(JA_WIKI), "--new-tokens", "500",
                 "--output", str(out), "--mecab", "--max-token-chars", "8"]) == 0
    rep = json.loads((out / "tokenizer_report.json").read_text(encoding="utf-8"))
    assert rep["new_tokens"] == 500 and rep["unreachable"] == 0 and rep["init"] == "subword_mean"
    assert rep["chars_per_token"]["ja"]["extended"] > rep["chars_per_token"]["ja"]["base"]
    assert rep["samples"] and "ja:" in capsys.readouterr().out
    # Rerunning into its own output is allowed; into another model's directory is not.
    with pytest.raises(XltError, match="another model"):
        _run(["tokenizer", "extend", "--model", src, "--corpus", str(JA_WIKI), "--new-tokens", "50", "--output", src])


@pytest.mark.parametrize("argv,msg", [
    (["--corpus", str(EN_TEXT), "--new-tokens", "100"], "Japanese"),
    (["--corpus", str(JA_WIKI), "--new-tokens", "0"], "must be > 0"),
    (["--corpus", str(JA_WIKI), "--new-tokens", "10", "--init", "bogus"], "embedding_init"),
    (["--corpus", "no-such-corpus", "--new-tokens", "10"], "neither a file nor an embedded corpus"),
])
def test_extend_command_errors(tmp_path, argv, msg):
    shared_file(JA_WIKI.name)
    shared_file(EN_TEXT.name)
    with pytest.raises(XltError, match=msg):
        _run(["tokenizer", "extend", "--output", str(tmp_path / "o")] + argv)
    assert not (tmp_path / "o").exists()  # nothing written, no model loaded
