"""The model resolver and every kind of data source (embedded, jsonl, txt, parquet, glob, streamed dataset)."""

from __future__ import annotations

import json
import os

import pytest

from xlt.config import XltError
from xlt.data.sources import heldout_texts, load_sources, read_documents
from xlt.embedded import EMBEDDED_CORPORA, embedded_documents, embedded_instruction_pairs
from xlt.models import resolve_model


def test_embedded_alias_converts_once_to_a_safetensors_checkpoint(tmp_path, monkeypatch):
    first = resolve_model("smollm2-135m")
    assert os.path.isfile(os.path.join(first, "model.safetensors"))
    with open(os.path.join(first, "config.json")) as f:
        config = json.load(f)
    assert "quantization_config" not in config and config["model_type"] == "llama"
    mtime = os.path.getmtime(os.path.join(first, "model.safetensors"))
    assert resolve_model("smollm2-135m") == first  # reused, not converted again
    assert os.path.getmtime(os.path.join(first, "model.safetensors")) == mtime


def test_resolver_accepts_directories_and_hub_ids_and_names_bad_specs(tmp_path, tiny_model_dir):
    assert resolve_model(tiny_model_dir) == tiny_model_dir
    assert resolve_model("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    with pytest.raises(XltError, match="unknown model 'smollm3'"):
        resolve_model("smollm3")
    with pytest.raises(XltError, match="without config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(XltError, match="not a model directory"):
        resolve_model(str(tmp_path / "missing"))


def test_embedded_model_and_tokenizer_load_with_auto_classes():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert len(tok) == model.config.vocab_size == 49152
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as in SmolLM2


def test_embedded_corpora_are_real_text():
    sizes = {name: sum(map(len, embedded_documents(name))) for name in EMBEDDED_CORPORA}
    assert sizes["hironsan"] > 20_000 and sizes["chatterbot-ja"] > 20_000 and sizes["chatterbot-en"] > 100_000
    assert "日本" in "".join(embedded_documents("hironsan"))
    pairs = embedded_instruction_pairs("ja")
    assert len(pairs) > 300 and all(p["instruction"] and p["output"] for p in pairs)


def test_local_files_jsonl_txt_parquet_and_globs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": f"文書{i}"}, ensure_ascii=False)
                                                for i in range(3)) + "\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "最後"}, ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp_path / "c.txt").write_bytes(b"first doc\nline two\n\nsecond doc\r\n\r\n\nthird\n")
    pq.write_table(pa.table({"text": ["x one", "x two"]}), tmp_path / "d.parquet")
    srcs = load_sources([
        {"name": "ja", "lang": "ja", "path": str(tmp_path / "*.jsonl"), "text_field": "body"},
        {"name": "txt", "lang": "en", "path": str(tmp_path / "c.txt")},
        {"name": "pq", "lang": "en", "path": str(tmp_path / "d.parquet")},
    ])
    assert srcs[0].all_documents() == ["文書0", "文書1", "文書2", "最後"]
    assert srcs[1].all_documents() == ["first doc\nline two", "second doc", "third"]
    assert srcs[2].all_documents() == ["x one", "x two"]
    assert read_documents(str(tmp_path / "a.jsonl"), "body", max_docs=2) == ["文書0", "文書1"]


def test_streamed_dataset_source_uses_the_datasets_streaming_path(tmp_path):
    # A dataset directory goes through the same `datasets.load_dataset(..., streaming=True)` call as a hub id.
    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(20)) + "\n")
    (src,) = load_sources([{"name": "hub", "lang": "en", "dataset": str(d), "split": "train"}])
    assert src.streaming
    docs = list(src.iter_stream(seed=1, epoch=0))
    assert sorted(docs) == sorted(f"doc {i}" for i in range(20))
    (bad,) = load_sources([{"name": "hub", "lang": "en", "dataset": str(d), "text_field": "content"}])
    with pytest.raises(XltError, match="no field 'content'"):
        list(bad.iter_stream())


@pytest.mark.parametrize("spec,match", [
    ({"name": "a", "lang": "ja", "path": "/nonexistent/x.jsonl"}, "data file not found"),
    ({"name": "a", "lang": "fr", "embedded": "hironsan"}, "lang must be one of"),
    ({"name": "a", "lang": "ja", "embedded": "wikipedia"}, "unknown embedded corpus"),
    ({"name": "a", "lang": "ja"}, "exactly one of"),
    ({"name": "a", "lang": "ja", "embedded": "hironsan", "wieght": 2}, "unknown key"),
])
def test_bad_source_specs_name_the_key(spec, match):
    with pytest.raises(XltError, match=r"sources\[0\]: .*" + match):
        load_sources([spec])


def test_a_file_without_the_text_field_is_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"content": "a"}) + "\n")
    with pytest.raises(XltError, match=r"sources\[0\]: .*x.jsonl has no field 'text' \(fields: content\)"):
        load_sources([{"name": "a", "lang": "en", "path": str(path)}])


def test_heldout_split_is_disjoint_from_training_and_covers_every_source():
    srcs = load_sources([{"name": "h", "lang": "ja", "embedded": "hironsan", "holdout": 0.1},
                         {"name": "c", "lang": "ja", "embedded": "chatterbot-ja", "holdout": 0.1}])
    for s in srcs:
        train, held = s.split_holdout()
        docs = s.all_documents()
        assert train == [d for i, d in enumerate(docs) if i % 10 != 9]  # a 0.1 holdout: every 10th document
        assert held and held == [d for d in docs[9::10] if d not in set(train)]  # no leakage of repeated text
    held = heldout_texts(srcs, max_docs=20)["ja"]
    assert len(held) == 20
    assert set(held) & set(srcs[0].split_holdout()[1]) and set(held) & set(srcs[1].split_holdout()[1])


def test_holdout_fraction_is_exact():
    from xlt.data.sources import Source

    src = Source(name="x", lang="en", path="unused", holdout=0.6)
    src._cache = [f"d{i}" for i in range(100)]
    train, held = src.split_holdout()
    assert len(held) == 60 and len(train) == 40
