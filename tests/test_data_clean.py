"""Cleaning of Japanese sources and the one-line errors on bad data settings."""

import json

import pytest
from data_fixtures import data_args, shared_sources, smol_tokenizer, write_small_corpus

from xlt.config import XltError
from xlt.data.clean import Cleaner, clean_documents, ja_share
from xlt.data.stream import build_pretrain_stream


def test_ja_share():
    assert ja_share("日本語のテキストです") == 1.0
    assert ja_share("abc") == 0.0
    assert ja_share("東京 is big") == pytest.approx(2 / 7)
    assert ja_share("   ") == 0.0


def test_cleaner_counts_every_reason():
    args = data_args([], clean_nfkc=True, clean_min_chars=5, clean_min_ja_share=0.5, clean_dedup=True)
    docs = ["", "  \n", "短い", "This is English text only.", "東京は日本の首都です。", "東京は日本の首都です。",
            "ｶﾀｶﾅとＡＢＣの文書です", "カタカナとABCの文書です"]
    kept, cleaner = clean_documents(docs, "ja", args)
    # NFKC maps half-width kana and full-width ASCII, so the last two become duplicates
    assert kept == ["東京は日本の首都です。", "カタカナとABCの文書です"]
    assert cleaner.report() == {"kept": 2, "heldout_kept": 0, "dropped": {"empty": 2, "too_short": 1, "low_ja_share": 1, "duplicate": 2}}


def test_english_sources_skip_japanese_filters():
    args = data_args([], clean_nfkc=True, clean_min_ja_share=0.9)
    c = Cleaner("en", args)
    assert c("ＡＢＣ plain English") == "ＡＢＣ plain English"  # no NFKC, no script filter for 'en'


def test_stream_reports_cleaning_and_holdout_does_not_leak(tmp_path):
    rows = ["重複する段落です。"] * 3 + [f"段落その{i}です。日本語の文章。" for i in range(20)] + ["short", "English only text here"]
    path = tmp_path / "ja.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows), encoding="utf-8")
    sources = [{"name": "ja", "lang": "ja", "path": str(path), "holdout": 0.2}, shared_sources(max_docs=50)[1]]
    args = data_args(sources, clean_min_chars=6, clean_min_ja_share=0.3)
    stream = build_pretrain_stream(args, smol_tokenizer(), 128 * 10, 2)
    rep = stream.cleaning_report["ja"]
    assert rep["kept"] + rep["heldout_kept"] + sum(rep["dropped"].values()) == len(rows)
    assert rep["dropped"]["duplicate"] >= 1 and rep["dropped"]["too_short"] == 1 and rep["dropped"]["low_ja_share"] == 1
    held = stream.heldout_texts()
    assert held["ja"] and held["en"] == []
    train = set(stream._train_docs["ja"])
    assert not train & set(held["ja"])  # held-out documents never appear in training
    assert "重複する段落です。" in train


@pytest.mark.parametrize("kw,match", [
    (dict(ja_ratio_start=1.5), "ja_ratio_start=1.5 is outside"),
    (dict(ja_schedule="piecewise", ja_points="0:0.2,0.7:0.5,0.3:0.6,1:0.6"), "fractions must increase"),
    (dict(ja_schedule="piecewise", ja_points="0:0.2,1:1.4"), "ratio 1.4"),
])
def test_bad_settings_fail_before_reading_data(tmp_path, kw, match):
    with pytest.raises(XltError, match=match):
        build_pretrain_stream(data_args(write_small_corpus(tmp_path), **kw), smol_tokenizer(), 1000, 2)


def test_language_without_source(tmp_path):
    ja_only = write_small_corpus(tmp_path)[:1]
    with pytest.raises(XltError, match="English is needed, but no source has lang: en"):
        build_pretrain_stream(data_args(ja_only, ja_ratio_start=0.8), smol_tokenizer(), 1000, 2)
    en_only = write_small_corpus(tmp_path)[1:]
    with pytest.raises(XltError, match="no source has lang: ja"):
        build_pretrain_stream(data_args(en_only, ja_schedule="linear", ja_ratio_start=0.0, ja_ratio_end=0.2),
                              smol_tokenizer(), 1000, 2)
    # a Japanese-only run at ratio 1 needs no English source
    build_pretrain_stream(data_args(ja_only, ja_ratio_start=1.0), smol_tokenizer(), 1000, 2)


def test_source_emptied_by_cleaning_is_named(tmp_path):
    sources = write_small_corpus(tmp_path)
    path = tmp_path / "latin.jsonl"
    path.write_text('{"text": "only latin letters"}\n{"text": "more latin"}\n', encoding="utf-8")
    sources.append({"name": "mislabelled", "lang": "ja", "path": str(path)})
    with pytest.raises(XltError, match=r"sources\[2\]: source 'mislabelled' is empty after cleaning \(low_ja_share=2\)"):
        build_pretrain_stream(data_args(sources, clean_min_ja_share=0.5), smol_tokenizer(), 1000, 2)
