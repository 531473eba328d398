"""Packing: exact per-document loss, lossless rows, BOS/EOS conventions."""

import itertools

import numpy as np
import pytest
import torch
from data_fixtures import char_tokenizer, data_args, smol_tokenizer, tiny_llama, write_small_corpus

from xlt.data.packing import IGNORE_INDEX, DocEncoder, detect_conventions
from xlt.data.stream import build_pretrain_stream


def _segments(row):
    starts = [i for i in range(len(row.position_ids)) if row.position_ids[i] == 0]
    return list(zip(starts, starts[1:] + [len(row.position_ids)], strict=False))


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_packed_loss_equals_per_document_losses(tmp_path, attn):
    sources = write_small_corpus(tmp_path)
    stream = build_pretrain_stream(data_args(sources, seq_len=256), smol_tokenizer(), 256 * 8, 2)
    rows = [r for r in itertools.islice(stream.global_rows(), 8) if len(r.segments) >= 3][:3]
    assert len(rows) == 3
    model = tiny_llama(len(smol_tokenizer()), attn)
    with torch.no_grad():
        for row in rows:
            segs = _segments(row)
            assert len(segs) == len(row.segments)
            ids, pos, labels = (torch.from_numpy(a)[None] for a in (row.input_ids, row.position_ids, row.labels))
            packed = model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False).loss.item()
            losses, weights = [], []
            model.config._attn_implementation = "eager"  # the reference: each document alone, plain attention
            for a, b in segs:
                if b - a < 2:
                    continue  # a one-token segment has no target
                doc = ids[:, a:b]
                losses.append(model(input_ids=doc, labels=doc, use_cache=False).loss.item())
                weights.append(b - a - 1)
            model.config._attn_implementation = attn
            expect = float(np.average(losses, weights=weights))
            assert packed == pytest.approx(expect, abs=1e-5, rel=0)
            # Honesty check: with a KV cache transformers does not build the packed mask, and the loss changes.
            from transformers import DynamicCache

            leaky = model(input_ids=ids, position_ids=pos, labels=labels, use_cache=True,
                          cache=DynamicCache(config=model.config)).loss.item()
            assert abs(leaky - expect) > 1e-3, (leaky, expect)


def test_rows_hold_every_document_token_once(tmp_path):
    sources = write_small_corpus(tmp_path)
    tok = smol_tokenizer()
    stream = build_pretrain_stream(data_args(sources, seq_len=128), tok, 128 * 200, 4)
    enc = DocEncoder(tok)
    pieces: dict[tuple, list] = {}
    for row in itertools.islice(stream.global_rows(), 200):
        assert len(row.input_ids) == len(row.position_ids) == len(row.labels) == 128
        w = 0
        for name, where, off, n in row.segments:
            assert row.position_ids[w] == 0 and row.labels[w] == IGNORE_INDEX
            assert list(row.position_ids[w:w + n]) == list(range(n))
            assert (row.labels[w + 1:w + n] == row.input_ids[w + 1:w + n]).all()
            pieces.setdefault((name, where["epoch"], where["index"]), []).append((off, row.input_ids[w:w + n]))
            w += n
        assert w == 128  # no padding
    from xlt.data.mixture import permutation

    complete = 0
    for (name, epoch, index), parts in pieces.items():
        docs = stream._train_docs[name]
        text = docs[permutation(0, name, epoch, len(docs))[index]]
        expect = enc.encode([text])[0]
        offs = [o for o, _ in parts]
        assert offs == sorted(offs) and offs[0] == 0
        got = np.concatenate([p for _, p in parts])
        assert np.array_equal(got, expect[:len(got)])  # pieces are contiguous, in order, never overlapping
        complete += len(got) == len(expect)
    assert complete >= len(pieces) - 2  # only the two open documents may be unfinished
    assert any(len(parts) > 1 for parts in pieces.values())  # long documents continue in the next row


@pytest.mark.parametrize("add_bos", [True, False])
def test_bos_only_when_the_tokenizer_adds_it_and_always_eos(add_bos):
    texts = ["あいうえお", "abc def", "かきく"]
    tok = char_tokenizer(texts, add_bos)
    conv = detect_conventions(tok)
    assert (conv.bos_id is not None) == add_bos and conv.eos_id == tok.eos_token_id
    enc = DocEncoder(tok).encode(texts)
    for text, ids in zip(texts, enc, strict=False):
        body = tok(text, add_special_tokens=False)["input_ids"]
        assert list(ids) == ([tok.bos_token_id] if add_bos else []) + body + [tok.eos_token_id]


def test_fast_encoder_matches_tokenizer_call():
    tok = smol_tokenizer()
    assert detect_conventions(tok).bos_id is None  # SmolLM2 adds no BOS by default
    texts = ["梅雨（つゆ、ばいう）は、東アジアの気象現象。", "First Citizen:\nBefore we proceed any further, hear me speak.", " x "]
    for text, ids in zip(texts, DocEncoder(tok).encode(texts), strict=False):
        assert list(ids[:-1]) == tok(text)["input_ids"] and ids[-1] == tok.eos_token_id
