"""Merge learning at scale: the streaming, deduplicated path learns exactly what the per-text path
learns, and the scale benchmark runs and reports its keys."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
from tok_fixtures import ROUND_TRIP, ja_docs, sentencepiece_bpe_dir
from tokenizers import Tokenizer

from xlt.tokenizer import merges as M

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRA = ROUND_TRIP + ["日本語 <|endoftext|> です。</s>と<s>", "全角　スペース　と  二つの空白  ", "▁記号▁▁入り", "ＡＢＣ１２３ｶﾀｶﾅ"]


@pytest.fixture(scope="module")
def sp_tj(tmp_path_factory) -> dict:
    return M.read_tokenizer_json(sentencepiece_bpe_dir(tmp_path_factory.mktemp("sp")))


def _corpus() -> list[str]:
    docs = list(ja_docs())[:400]
    return docs + EXTRA


def _same_as_reference(tj: dict, texts: list[str], n_merges: int = 600, **kw) -> None:
    family = M.detect_family(tj)
    base = Tokenizer.from_str(json.dumps(tj))
    fast = M.corpus_words(base, family, iter(texts), **kw)  # a one-pass iterator: the path streams
    ref = M.corpus_words_reference(base, family, texts, **kw)
    assert fast == ref and list(fast) == list(ref)  # same counts, same first-occurrence order
    plan = M.learn_merges(base, family, iter(texts), n_merges=n_merges)
    old = M.corpus_words
    try:  # the merges learned from the reference words (the previous implementation)
        M.corpus_words = lambda b, f, t, mecab=False, nfkc=False, **kw: M.corpus_words_reference(b, f, list(t), mecab)
        ref_plan = M.learn_merges(base, family, texts, n_merges=n_merges)
    finally:
        M.corpus_words = old
    assert plan.merges == ref_plan.merges and len(plan.merges) > 100
    assert plan.new_chars == ref_plan.new_chars and plan.stats == ref_plan.stats


def test_byte_level_same_words_and_merges():
    _same_as_reference(M.read_tokenizer_json("smollm2-135m"), _corpus())


def test_metaspace_same_words_and_merges(sp_tj):
    assert M._metaspace_split_ok(sp_tj["model"], sp_tj["model"]["vocab"])  # the pieces are cut at ▁
    _same_as_reference(sp_tj, _corpus())


def test_metaspace_merge_across_space_keeps_whole_pieces(sp_tj):
    """A base merge that joins a letter to a following ``▁...`` forbids cutting there; still identical."""
    tj = copy.deepcopy(sp_tj)
    vocab = tj["model"]["vocab"]
    left, right = "e", next(t for t in vocab if t.startswith("▁") and len(t) > 1 and t + "e" not in vocab)
    vocab[left + right] = max(vocab.values()) + 1
    tj["model"]["merges"].insert(0, [left, right] if isinstance(tj["model"]["merges"][0], list) else f"{left} {right}")
    assert not M._metaspace_split_ok(tj["model"], vocab)
    _same_as_reference(tj, _corpus() + [f"th{left}{right.replace('▁', ' ')} 日本"])


def test_nfkc_streams_too():
    tj = M.read_tokenizer_json("smollm2-135m")
    base = Tokenizer.from_str(json.dumps(tj))
    texts = _corpus()
    import unicodedata

    assert M.corpus_words(base, M.BYTE_LEVEL, iter(texts), nfkc=True) == M.corpus_words_reference(
        base, M.BYTE_LEVEL, [unicodedata.normalize("NFKC", t) for t in texts])


def test_mecab_fast_boundaries_are_the_node_surfaces():
    for text in _corpus() + ["改行\n\nあり\r\nです\tタブ", "  ", "\u3000\u3000"]:
        assert M._mecab_boundaries_fast(text) == M._mecab_boundaries(text), text


def _mecab_same_in_processes(tj: dict) -> None:
    """MeCab words and merges: 2 processes == 1 process == the reference (counts, key order, merges)."""
    family = M.detect_family(tj)
    base = Tokenizer.from_str(json.dumps(tj))
    texts = _corpus()
    ref = M.corpus_words_reference(base, family, texts, mecab=True)
    # Small batches: many batches, so both workers count some and results arrive out of order.
    one = M.corpus_words(base, family, iter(texts), mecab=True, num_proc=1, batch_chars=3000)
    two = M.corpus_words(base, family, iter(texts), mecab=True, num_proc=2, batch_chars=3000)
    assert ref == one == two
    assert list(ref) == list(one) == list(two)  # first-occurrence order: the trainer's tie-breaking
    plan = M.learn_merges(base, family, iter(texts), n_merges=600, mecab=True, num_proc=2)
    assert plan.timings["num_proc"] == 2 and plan.timings["count_seconds"] > 0
    old = M.corpus_words
    try:
        M.corpus_words = lambda b, f, t, mecab=False, nfkc=False, **kw: M.corpus_words_reference(b, f, list(t), mecab)
        ref_plan = M.learn_merges(base, family, texts, n_merges=600, mecab=True)
    finally:
        M.corpus_words = old
    assert plan.merges == ref_plan.merges and len(plan.merges) > 100
    assert plan.new_chars == ref_plan.new_chars and plan.stats == ref_plan.stats


def test_mecab_processes_byte_level():
    _mecab_same_in_processes(M.read_tokenizer_json("smollm2-135m"))


def test_mecab_processes_metaspace(sp_tj):
    _mecab_same_in_processes(sp_tj)


def test_num_proc_key_checked():
    from xlt.config import TokenizerArguments, XltError
    from xlt.tokenizer.extend import check_tokenizer_inputs

    assert TokenizerArguments().tokenizer_num_proc is None and 1 <= M.default_num_proc() <= 16
    with pytest.raises(XltError, match="tokenizer_num_proc=0"):
        check_tokenizer_inputs("smollm2-135m", TokenizerArguments(tokenizer_mode="extend", new_tokens=10,
                                                                  tokenizer_num_proc=0))


def test_scale_bench_mecab_smoke():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "tokenizer_scale.py"), "--sizes", "30000",
                           "--merges", "300", "--mecab", "--processes", "2", "--json"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["mecab"] is True and out["processes"] == 2
    (r,) = out["sizes"]
    assert r["num_proc"] == 2 and 100 < r["merges"] <= 300
    assert 0 < r["count_seconds"] + r["train_seconds"] <= r["seconds"]
    assert out["per_process_chars_per_second"] > 0 and out["projected_seconds_500m_16proc"] > 0


def test_scale_bench_smoke():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "tokenizer_scale.py"), "--sizes", "20000", "40000",
                           "--merges", "300", "--json"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert [r["chars"] for r in out["sizes"]] == [20000, 40000]
    for r in out["sizes"]:
        assert r["seconds"] > 0 and r["peak_rss_mb"] >= r["text_rss_mb"] > 10
        assert 100 < r["merges"] <= 300
    assert out["chars_per_second"] > 0
    assert out["projected_seconds_500m"] == pytest.approx(500e6 / out["chars_per_second"], rel=1e-3)
