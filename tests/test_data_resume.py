"""Determinism and resume: O(1) state, byte-identical continuation, state_at, 2 ranks over gloo."""

import itertools
import json
import pickle

import pytest
import torch.multiprocessing as mp
from data_fixtures import data_args, dist_worker, rows_bytes, shared_sources, smol_tokenizer, write_small_corpus

from xlt.config import XltError
from xlt.data.stream import build_pretrain_stream

KW = dict(seq_len=64, ja_schedule="linear", ja_ratio_start=0.3, ja_ratio_end=0.8, slw_min_len=16, slw_fraction=0.3)
RPS = 4  # rows per step
TOTAL = 64 * RPS * 60


def _stream(sources, rank=0, world=1, **kw):
    return build_pretrain_stream(data_args(sources, **{**KW, **kw}), smol_tokenizer(), TOTAL, RPS, rank, world)


def _take(stream, n):
    return list(itertools.islice(iter(stream), n))


@pytest.mark.parametrize("k_rows", [5 * RPS, 5 * RPS + 3, 37 * RPS])  # step boundary, mid-step, after epochs
def test_resume_is_byte_identical(tmp_path, k_rows):
    sources = write_small_corpus(tmp_path, n_ja=15, n_en=20)  # small: several epochs, long docs split
    full = rows_bytes(_take(_stream(sources), 60 * RPS))
    first = _stream(sources)
    _take(first, k_rows)
    state = json.loads(json.dumps(first.state_dict()))  # JSON round trip, like a checkpoint
    assert state["row"] == k_rows
    resumed = _stream(sources)
    resumed.load_state_dict(state)
    rest = rows_bytes(_take(resumed, 60 * RPS - k_rows))
    assert rest == full[k_rows:]
    assert resumed.accounting.to_dict() == _accounting_after(sources, 60 * RPS)


def _accounting_after(sources, n):
    s = _stream(sources)
    _take(s, n)
    return s.accounting.to_dict()


def test_state_at_survives_prefetch(tmp_path):
    sources = write_small_corpus(tmp_path, n_ja=15, n_en=20)
    full = rows_bytes(_take(_stream(sources), 40))
    ahead = _stream(sources)
    _take(ahead, 23)  # the DataLoader fetched 23 rows, the optimizer consumed 20
    state = ahead.state_at(20)
    assert state["row"] == 20 and ahead.state_dict()["row"] == 23
    acc20 = ahead.accounting_at(20)
    assert sum(acc20["tokens_trained"].values()) == 20 * 64
    resumed = _stream(sources)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert rows_bytes(_take(resumed, 20)) == full[20:]
    with pytest.raises(XltError, match="no state for 500 rows"):
        ahead.state_at(500)


def test_resume_is_o1_no_replay(tmp_path, monkeypatch):
    sources = write_small_corpus(tmp_path, n_ja=15, n_en=20)
    first = _stream(sources)
    _take(first, 200)
    state = first.state_dict()
    resumed = _stream(sources)
    resumed.load_state_dict(state)
    from xlt.data import packing

    calls = []
    orig = packing.DocEncoder.encode
    monkeypatch.setattr(packing.DocEncoder, "encode", lambda self, texts: calls.append(len(texts)) or orig(self, texts))
    _take(resumed, 1)
    # Only the open documents and one look-ahead batch per source are tokenised, not 200 rows of history.
    assert sum(calls) <= 2 + 2 * 256 and len(calls) <= 4


def test_state_from_other_settings_is_refused(tmp_path):
    sources = write_small_corpus(tmp_path)
    s = _stream(sources)
    _take(s, 3)
    other = _stream(sources, stream_seed=1)
    with pytest.raises(XltError, match="stream_seed, sources and seq_len"):
        other.load_state_dict(s.state_dict())


def test_a_checkpoint_of_the_token_shards_is_refused_naming_data_source(tmp_path):
    """data_source changed between launches (shards is the default, stream the other): one line saying which."""
    s = _stream(write_small_corpus(tmp_path))
    shards_state = {"version": 1, "kind": "shards", "row": 8, "fingerprint": {"data": "0" * 64, "seed": 0}}
    with pytest.raises(XltError, match=r"^data stream: the checkpoint was written on token shards; resume with "
                                       r"data_source: shards$"):
        s.load_state_dict(shards_state)


def test_seed_changes_the_stream_and_same_seed_repeats_it(tmp_path):
    sources = write_small_corpus(tmp_path)
    a, b = rows_bytes(_take(_stream(sources), 8)), rows_bytes(_take(_stream(sources), 8))
    c = rows_bytes(_take(_stream(sources, stream_seed=7), 8))
    assert a == b and a != c


def test_two_processes_gloo_disjoint_union_is_the_single_stream(tmp_path):
    sources = shared_sources(max_docs=200)
    n_rows = 24
    single = list(itertools.islice(_stream(sources).global_rows(), 2 * n_rows))
    mp.spawn(dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path), sources, KW, TOTAL, RPS, n_rows),
             nprocs=2, join=True)
    with open(tmp_path / "gathered.pkl", "rb") as f:
        gathered = pickle.load(f)
    idx0 = [r[0] for r in gathered[0]["rows"]]
    idx1 = [r[0] for r in gathered[1]["rows"]]
    assert not set(idx0) & set(idx1)
    assert idx0 == list(range(0, 2 * n_rows, 2)) and idx1 == list(range(1, 2 * n_rows, 2))
    union = sorted(gathered[0]["rows"] + gathered[1]["rows"])
    assert [r[0] for r in union] == [r.index for r in single]
    for got, want in zip(union, single, strict=False):
        assert got[1] == want.input_ids.tolist() and got[2] == want.position_ids.tolist()
        assert got[3] == want.labels.tolist()
    for rank in (0, 1):  # iter() (the DataLoader path) yields the same rows as global_rows(own_only)
        want = [r for r in single if r.index % 2 == rank][:3]
        assert gathered[rank]["iter"] == [
            b"".join(x.tobytes() for x in (r.input_ids, r.position_ids, r.labels)) for r in want]
