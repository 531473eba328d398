"""Sequence-length warmup (reshape mode) trains every token; accounting equals the corpus passes."""

import itertools

import numpy as np
from data_fixtures import data_args, smol_tokenizer, write_small_corpus

from xlt.data.accounting import log_metrics
from xlt.data.mixture import permutation
from xlt.data.packing import IGNORE_INDEX, DocEncoder
from xlt.data.schedule import seq_len_at
from xlt.data.stream import build_pretrain_stream


def test_slw_reshape_trains_every_token_and_accounting_matches_the_passes(tmp_path):
    sources = write_small_corpus(tmp_path, n_ja=10, n_en=25)
    seq_len, rps, steps = 128, 2, 120
    total = seq_len * rps * steps
    args = data_args(sources, seq_len=seq_len, slw_min_len=16, slw_fraction=0.5, ja_schedule="linear",
                     ja_ratio_start=0.4, ja_ratio_end=0.7)
    tok = smol_tokenizer()
    stream = build_pretrain_stream(args, tok, total, rps)
    enc = DocEncoder(tok)
    corpus = {name: [enc.encode([d])[0] for d in docs] for name, docs in stream._train_docs.items()}

    placed: dict[str, dict[tuple, list]] = {name: {} for name in corpus}
    warm_seen, n_segments, n_targets = [], 0, 0
    for g, row in enumerate(itertools.islice(stream.global_rows(), rps * steps)):
        warm = seq_len_at(g * seq_len, total, args)
        assert row.warm_len == warm and len(row.input_ids) == seq_len  # rows stay rectangular
        warm_seen.append(warm)
        # position ids restart at every sub-row boundary: attention never spans more than `warm` tokens
        for b in range(0, seq_len, warm):
            assert row.position_ids[b] == 0
        assert row.position_ids.max() < warm
        w = 0
        for name, where, off, n in row.segments:
            assert w // warm == (w + n - 1) // warm  # a segment never crosses a sub-row boundary
            placed[name].setdefault((where["epoch"], where["index"]), []).append((off, row.input_ids[w:w + n]))
            w += n
        n_segments += len(row.segments)
        n_targets += int((row.labels != IGNORE_INDEX).sum())
    assert warm_seen[0] == 16 and warm_seen[-1] == seq_len and warm_seen == sorted(warm_seen)

    acc = stream.accounting.to_dict()
    for name, docs in corpus.items():
        n = len(docs)
        epochs = acc["epochs_by_source"][name]
        full_epochs = int(epochs)
        assert full_epochs >= 2, (name, epochs)
        # Every token of every complete pass was placed, in order, exactly once (nothing truncated or dropped).
        expected_trained = 0
        for epoch in range(full_epochs + 1):
            perm = permutation(args.stream_seed, name, epoch, n)
            for index in range(n):
                parts = placed[name].get((epoch, index))
                if parts is None:
                    assert epoch == full_epochs  # only the current pass may be unfinished
                    continue
                doc = docs[perm[index]]
                got = np.concatenate([p for _, p in parts])
                if epoch < full_epochs:
                    assert np.array_equal(got, doc)
                else:
                    assert np.array_equal(got, doc[:len(got)])
                expected_trained += len(got)
        assert acc["tokens_by_source"][name] == expected_trained
        pass_tokens = sum(len(d) for d in docs)
        assert expected_trained >= full_epochs * pass_tokens
    assert sum(acc["tokens_trained"].values()) == total  # every slot is a corpus token: no padding
    assert sum(acc["target_tokens"].values()) == n_targets == total - n_segments
    assert acc["tokens_read"]["ja"] >= acc["tokens_trained"]["ja"]
    assert acc["chars"]["ja"] > 0 and acc["chars"]["en"] > 0
    metrics = log_metrics(acc)
    assert metrics["data/tokens_trained_ja"] == acc["tokens_trained"]["ja"]
    assert "data/epochs_ja_small" in metrics
