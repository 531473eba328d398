"""Extension of a real SentencePiece-style BPE with byte fallback (Llama-2 / Mistral layout)."""

from __future__ import annotations

import json
import os

import pytest
import sentencepiece as spm
import torch
from tok_fixtures import ROUND_TRIP, en_text, ja_split, sentencepiece_bpe_dir, tiny_model_dir
from tokenizers import Tokenizer

from xlt.config import TokenizerArguments, XltError
from xlt.tokenizer.extend import (
    build_tokenizer_stage,
    chars_per_token,
    check_tokenizer_inputs,
    extend_tokenizer_json,
    unreachable_tokens,
)
from xlt.tokenizer.merges import METASPACE, detect_family, merges_as_pairs, read_tokenizer_json

N_NEW = 1500


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> str:
    return sentencepiece_bpe_dir(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def base_tj(sp_dir) -> dict:
    return read_tokenizer_json(sp_dir)


@pytest.fixture(scope="module")
def ext(base_tj):
    train, _ = ja_split()
    return extend_tokenizer_json(base_tj, train, N_NEW)


def _tok(tj: dict) -> Tokenizer:
    return Tokenizer.from_str(json.dumps(tj))


def test_fixture_is_the_sentencepiece_model(sp_dir, base_tj):
    """The converted tokenizer.json encodes exactly as the sentencepiece library does."""
    sp = spm.SentencePieceProcessor(model_file=os.path.join(sp_dir, "tokenizer.model"))
    tok = _tok(base_tj)
    assert detect_family(base_tj) == METASPACE
    assert tok.id_to_token(3 + 0xE6) == "<0xE6>"  # byte-fallback pieces
    for line in en_text().split("\n")[:2000] + ROUND_TRIP:
        assert tok.encode(line, add_special_tokens=False).ids == sp.encode(line)


def test_new_tokens_and_merges(base_tj, ext):
    assert ext.family == METASPACE
    assert len(ext.new_ids) == N_NEW
    old_vocab, new_vocab = base_tj["model"]["vocab"], ext.tokenizer_json["model"]["vocab"]
    assert all(new_vocab[s] == i for s, i in old_vocab.items())
    old_m, new_m = merges_as_pairs(base_tj["model"]), merges_as_pairs(ext.tokenizer_json["model"])
    assert new_m[: len(old_m)] == old_m and len(new_m) > len(old_m)
    tok = ext.tokenizer()
    strings = [tok.id_to_token(i) for i in ext.new_ids]
    assert sum(len(s) == 1 for s in strings) > 100  # missing characters become tokens (no more byte fallback)
    assert all("▁" not in s[1:] for s in strings)  # no merge crosses a word start


def test_round_trip_and_english_ids(base_tj, ext):
    _, held = ja_split()
    for tok in (_tok(base_tj), ext.tokenizer()):
        for t in ROUND_TRIP + held[:20]:
            assert tok.decode(tok.encode(t, add_special_tokens=False).ids) == t
    text = en_text()
    assert ext.tokenizer().encode(text).ids == _tok(base_tj).encode(text).ids


def test_reachable_and_compression(base_tj, ext):
    tok = ext.tokenizer()
    assert ext.unreachable == 0 and unreachable_tokens(tok, METASPACE, ext.new_ids) == []
    for i in ext.new_ids:
        s = tok.id_to_token(i)
        assert [t.id for t in tok.model.tokenize(s)] == [i]
        if s.startswith("▁"):
            assert tok.encode(tok.decode([i]), add_special_tokens=False).ids == [i]
    _, held = ja_split()
    b, a = chars_per_token(_tok(base_tj), held), chars_per_token(tok, held)
    assert a > 3 * b  # byte fallback costs ~3 tokens per kana/kanji


def test_byte_fallback_share_drops(base_tj, ext):
    _, held = ja_split()

    def byte_share(tok):
        toks = [t for e in tok.encode_batch(held, add_special_tokens=False) for t in e.tokens]
        return sum(t.startswith("<0x") for t in toks) / len(toks)

    before, after = byte_share(_tok(base_tj)), byte_share(ext.tokenizer())
    assert before > 0.5 and after < 0.3 and after < before / 2


@pytest.mark.parametrize("tied", [True, False])
def test_stage_with_spm_model(tmp_path, sp_dir, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model_dir(tmp_path, sp_dir, tied=tied)
    old = AutoModelForCausalLM.from_pretrained(src)
    old_in, old_out = old.get_input_embeddings().weight.detach().clone(), old.get_output_embeddings().weight.detach().clone()
    train, held = ja_split()
    out = str(tmp_path / "out")
    rep = build_tokenizer_stage(src, TokenizerArguments(tokenizer_mode="extend", new_tokens=800), train[:400],
                                {"ja": held[:30], "en": [en_text()[:4000]]}, out)
    assert rep["family"] == METASPACE and rep["unreachable"] == 0 and rep["new_tokens"] == 800
    model = AutoModelForCausalLM.from_pretrained(out)
    new_in, new_out = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    assert new_in.shape[0] % 64 == 0
    assert torch.equal(new_in[:2000], old_in) and torch.equal(new_out[:2000], old_out)
    # A new character's row is the mean of its byte-fallback rows.
    ext = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    i = ext.token_to_id("の")
    b = [3 + x for x in "の".encode()]
    assert torch.allclose(new_in[i], old_in[b].mean(0), atol=1e-6)
    assert torch.allclose(new_out[i], old_out[b].mean(0), atol=1e-6)
    hf = AutoTokenizer.from_pretrained(out)
    t = held[0]
    assert hf.decode(hf(t)["input_ids"], skip_special_tokens=True) == t
    assert hf(t, add_special_tokens=False)["input_ids"] == ext.encode(t, add_special_tokens=False).ids


def test_slow_tokenizer_model_only_is_refused(tmp_path, sp_dir):
    d = tmp_path / "slow"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(open(os.path.join(sp_dir, "tokenizer.model"), "rb").read())
    (d / "config.json").write_text("{}")
    with pytest.raises(XltError, match="no tokenizer.json.*python -m xlt.tokenizer.spm"):
        check_tokenizer_inputs(str(d), TokenizerArguments(tokenizer_mode="extend", new_tokens=10))
    from xlt.tokenizer.spm import main

    assert main([str(d)]) == 0  # the converter the message points to
    check_tokenizer_inputs(str(d), TokenizerArguments(tokenizer_mode="extend", new_tokens=10))
