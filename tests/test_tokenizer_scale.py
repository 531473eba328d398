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
        M.corpus_words = lambda b, f, t, mecab=False, nfkc=False: M.corpus_words_reference(b, f, list(t), mecab)
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
