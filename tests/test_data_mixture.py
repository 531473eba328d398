"""The mixer realises every schedule at token level; weights, repetition and epoch warnings."""

import itertools

import pytest
from data_fixtures import SCHEDULES, data_args, shared_sources, smol_tokenizer, write_small_corpus

from xlt.data.schedule import cumulative_ja_target, ja_ratio
from xlt.data.stream import build_pretrain_stream


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_is_realised_per_step_and_cumulatively(name):
    seq_len, rows_per_step, steps = 128, 4, 150
    step_tokens = seq_len * rows_per_step
    total = steps * step_tokens
    args = data_args(shared_sources(), seq_len=seq_len, slw_min_len=32, **SCHEDULES[name])
    stream = build_pretrain_stream(args, smol_tokenizer(), total, rows_per_step)
    rows = itertools.islice(stream.global_rows(), steps * rows_per_step)
    ja = cum_ja = 0
    checked = 0
    for i, row in enumerate(rows):
        ja += row.lang_tokens["ja"]
        assert sum(row.lang_tokens.values()) == seq_len
        if (i + 1) % rows_per_step:
            continue
        step = (i + 1) // rows_per_step
        t0, t1 = (step - 1) * step_tokens, step * step_tokens
        cum_ja += ja
        # this step's own share: the schedule's mean over the step's tokens, up to rounding
        step_target = (cumulative_ja_target(t1, total, args) - cumulative_ja_target(t0, total, args)) / step_tokens
        assert abs(ja / step_tokens - step_target) <= 1.0 / step_tokens
        if SCHEDULES[name].get("ja_schedule") not in ("step", "piecewise"):
            assert abs(ja / step_tokens - ja_ratio((t0 + t1) / 2, total, args)) < 0.01
        # cumulative share within +-0.5 points of the cumulative target after the first 5 %
        if t1 >= 0.05 * total:
            cum_target = cumulative_ja_target(t1, total, args) / t1
            assert abs(cum_ja / t1 - cum_target) <= 0.005, (step, cum_ja / t1, cum_target)
            checked += 1
        ja = 0
    assert checked >= 0.9 * steps
    acc = stream.accounting.to_dict()
    assert acc["tokens_trained"]["ja"] == cum_ja
    assert sum(acc["tokens_trained"].values()) == total


def test_languages_mix_inside_rows():
    args = data_args(shared_sources(), seq_len=256, ja_ratio_start=0.5)
    stream = build_pretrain_stream(args, smol_tokenizer(), 256 * 40, 4)
    rows = list(itertools.islice(stream.global_rows(), 40))
    mixed = sum(1 for r in rows if r.lang_tokens["ja"] and r.lang_tokens["en"])
    assert mixed >= 30  # not one language per row


def test_weights_within_a_language(tmp_path):
    small = write_small_corpus(tmp_path)
    sources = [dict(small[0], weight=3.0), dict(shared_sources()[0], weight=1.0), small[1]]
    args = data_args(sources, seq_len=128, ja_ratio_start=0.6)
    stream = build_pretrain_stream(args, smol_tokenizer(), 128 * 400, 4)
    for _ in itertools.islice(stream.global_rows(), 400):
        pass
    read = stream.accounting.tokens_read_by_source
    ja_read = read["ja_small"] + read["wiki"]
    longest = 2000  # a source can be ahead of its share by at most one document
    assert abs(read["ja_small"] - 0.75 * ja_read) <= longest


def test_default_weights_follow_size(tmp_path):
    small = write_small_corpus(tmp_path)
    sources = [small[0], shared_sources()[0], small[1]]
    stream = build_pretrain_stream(data_args(sources, seq_len=128, ja_ratio_start=0.6), smol_tokenizer(), 128 * 800, 4)
    w = stream.weights
    assert w["wiki"] > 5 * w["ja_small"] and w["wiki"] + w["ja_small"] == pytest.approx(1.0)
    assert w["en_small"] == 1.0
    for _ in itertools.islice(stream.global_rows(), 800):
        pass
    ep = stream.accounting.epochs_by_source
    assert ep["ja_small"] == pytest.approx(ep["wiki"], abs=0.15)  # both advance at the same pace


def test_repetition_reshuffles_and_counts_epochs(tmp_path, caplog):
    from xlt.data.mixture import permutation

    sources = write_small_corpus(tmp_path, n_ja=12, n_en=300)
    args = data_args(sources, seq_len=64, ja_ratio_start=0.5, max_epochs_warning=4.0)
    total = 64 * 4 * 300
    with caplog.at_level("WARNING", logger="xlt.data"):
        stream = build_pretrain_stream(args, smol_tokenizer(), total, 4)
    assert any("'ja_small' would be seen" in w for w in stream.warnings)
    assert not any("'en_small' would be seen" in w for w in stream.warnings)
    assert any("Muennighoff" in r.message for r in caplog.records)
    docs = stream._train_docs["ja_small"]
    n_docs = len(docs)
    orders: dict[int, list[int]] = {}
    for row in itertools.islice(stream.global_rows(), 1200):
        for name, where, off, _n in row.segments:
            if name == "ja_small" and off == 0:
                doc_id = int(permutation(args.stream_seed, name, where["epoch"], n_docs)[where["index"]])
                orders.setdefault(where["epoch"], []).append(doc_id)
    full = [e for e in orders if len(orders[e]) == n_docs]
    assert len(full) >= 4
    for e in full:
        assert sorted(orders[e]) == list(range(n_docs))  # every document exactly once per epoch
    assert len({tuple(orders[e]) for e in full}) == len(full)  # a fresh shuffle every epoch
    ep = stream.accounting.epochs_by_source["ja_small"]
    assert ep > 4 and int(ep) == max(orders)  # fractional epochs tracked: completed + current fraction
    assert any("'ja_small' is now in epoch" in w for w in stream.warnings)
