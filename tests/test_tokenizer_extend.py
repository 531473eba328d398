"""Extension of a real byte-level BPE tokenizer (SmolLM2) with merges learned on real Japanese text."""

from __future__ import annotations

import json

import pytest
from tok_fixtures import ROUND_TRIP, en_text, ja_split, smollm2_dir
from tokenizers import Tokenizer

from conftest import unavailable
from xlt.tokenizer.extend import chars_per_token, extend_tokenizer_json, unreachable_tokens
from xlt.tokenizer.merges import BYTE_LEVEL, is_whole_text, merges_as_pairs, read_tokenizer_json, token_bytes

N_NEW = 2000


@pytest.fixture(scope="module")
def base_tj() -> dict:
    return read_tokenizer_json(smollm2_dir())


@pytest.fixture(scope="module")
def ext(base_tj):
    train, _ = ja_split()
    return extend_tokenizer_json(base_tj, train, N_NEW)


def _tok(tj: dict) -> Tokenizer:
    return Tokenizer.from_str(json.dumps(tj))


def test_counts_and_ids(base_tj, ext):
    assert ext.family == BYTE_LEVEL
    assert len(ext.new_ids) == N_NEW
    old_vocab, new_vocab = base_tj["model"]["vocab"], ext.tokenizer_json["model"]["vocab"]
    for s, i in old_vocab.items():
        assert new_vocab[s] == i
    assert sorted(ext.new_ids) == list(range(len(old_vocab), len(old_vocab) + N_NEW))
    old_m, new_m = merges_as_pairs(base_tj["model"]), merges_as_pairs(ext.tokenizer_json["model"])
    assert new_m[: len(old_m)] == old_m  # appended after every original merge
    assert len(new_m) == len(old_m) + ext.new_merges
    known = set(old_vocab)
    for a, b in new_m[len(old_m):]:  # each merge's parts exist before it (or in the original vocab)
        assert a in known and b in known
        known.add(a + b)


def test_round_trip_before_and_after(base_tj, ext):
    _, held = ja_split()
    texts = ROUND_TRIP + held[:20] + [en_text()[:3000]]
    for tok in (_tok(base_tj), ext.tokenizer()):
        for t in texts:
            assert tok.decode(tok.encode(t, add_special_tokens=False).ids, skip_special_tokens=False) == t


def test_english_ids_identical_on_whole_text(base_tj, ext):
    text = en_text()
    assert ext.tokenizer().encode(text).ids == _tok(base_tj).encode(text).ids


def test_new_segmentation_only_coarsens_old(base_tj, ext):
    """New merges fire after the old ones: every new token boundary is an old token boundary,
    and a text whose encoding uses no new id is segmented exactly as before."""
    base, new = _tok(base_tj), ext.tokenizer()
    _, held = ja_split()
    unchanged = 0
    for text in held + ROUND_TRIP:
        b, n = base.encode(text, add_special_tokens=False), new.encode(text, add_special_tokens=False)

        def cuts(enc, tok):
            pos, out = 0, set()
            for t in enc.tokens:
                pos += len(token_bytes(t, BYTE_LEVEL))
                out.add(pos)
            return out

        assert cuts(n, new) <= cuts(b, base)
        if not set(n.ids) & set(ext.new_ids):
            assert n.ids == b.ids
            unchanged += 1
    assert unchanged >= 3  # the English / code / emoji samples


def test_every_new_token_reachable(ext):
    tok = ext.tokenizer()
    assert ext.unreachable == 0
    assert unreachable_tokens(tok, BYTE_LEVEL, ext.new_ids) == []
    whole = 0
    for i in ext.new_ids:
        s = tok.id_to_token(i)
        assert [t.id for t in tok.model.tokenize(s)] == [i]
        if is_whole_text(s, BYTE_LEVEL):
            whole += 1
            assert tok.encode(tok.decode([i]), add_special_tokens=False).ids == [i]
    assert whole > N_NEW // 2


def test_compression_gain(base_tj, ext):
    _, held = ja_split()
    before, after = chars_per_token(_tok(base_tj), held), chars_per_token(ext.tokenizer(), held)
    assert before < 0.7 and after > 1.3 * before


def test_max_token_chars_and_min_frequency(base_tj):
    train, _ = ja_split()
    ext = extend_tokenizer_json(base_tj, train[:300], 500, max_token_chars=3)
    tok = ext.tokenizer()
    assert all(len(token_bytes(tok.id_to_token(i), BYTE_LEVEL).decode("utf-8", "replace")) <= 3 for i in ext.new_ids)
    rare = extend_tokenizer_json(base_tj, train[:300], 5000, min_frequency=50)
    assert 0 < len(rare.new_ids) < 5000  # only pairs seen 50+ times qualify


def test_nfkc_option(base_tj):
    train, _ = ja_split()
    fw = [t.translate({c: c + 0xFEE0 for c in range(0x21, 0x7F)}) for t in train[:200]]  # ASCII -> full-width
    plain = extend_tokenizer_json(base_tj, fw, 1500)
    nfkc = extend_tokenizer_json(base_tj, fw, 1500, nfkc=True)

    def fullwidth_tokens(e):
        tok = e.tokenizer()
        return sum(any(0xFF01 <= ord(c) <= 0xFF5E for c in tok.decode([i])) for i in e.new_ids)

    assert fullwidth_tokens(nfkc) == 0 < fullwidth_tokens(plain)


def test_mecab_boundaries(base_tj):
    try:
        import fugashi  # noqa: F401
        import unidic_lite  # noqa: F401
    except ImportError:
        unavailable("fugashi / unidic-lite not installed (pip install 'xlt[mecab]', part of make setup)")
    from xlt.tokenizer.merges import _mecab_boundaries

    train, _ = ja_split()
    docs = train[:400]

    def crossing_share(e) -> float:
        tok, new, cross, total = e.tokenizer(), set(e.new_ids), 0, 0
        for d in docs[:100]:
            bounds = _mecab_boundaries(d)
            enc = tok.encode(d, add_special_tokens=False)
            for i, (s, t) in zip(enc.ids, enc.offsets):
                if i in new:
                    total += 1
                    cross += any(s < b < t for b in bounds)
        return cross / max(1, total)

    plain, mecab = extend_tokenizer_json(base_tj, docs, 1000), extend_tokenizer_json(base_tj, docs, 1000, mecab=True)
    assert crossing_share(mecab) < 0.5 * crossing_share(plain)
