"""Streamed (``datasets`` IterableDataset) sources, exercised offline with a local dataset folder."""

import itertools
import json

from data_fixtures import JA_WIKI, data_args, shared_sources, smol_tokenizer

from conftest import shared_file
from xlt.data.stream import build_pretrain_stream


def test_streamed_source_epochs_state_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "hub_like"
    folder.mkdir()
    lines = shared_file(JA_WIKI.name).read_text(encoding="utf-8").splitlines()[:30]
    (folder / "train.jsonl").write_text("\n".join(lines + lines[:5]) + "\n", encoding="utf-8")  # 5 duplicates
    sources = [{"name": "streamed", "lang": "ja", "dataset": str(folder)}, shared_sources(max_docs=300)[1]]
    args = data_args(sources, seq_len=128, ja_ratio_start=0.6)
    stream = build_pretrain_stream(args, smol_tokenizer(), 128 * 4 * 80, 4)
    assert stream.heldout_texts()["ja"] == []  # no holdout for streamed sources
    rows = list(itertools.islice(stream.global_rows(), 320))
    acc = stream.accounting.to_dict()
    assert acc["epochs_by_source"]["streamed"] >= 2  # the 30-document stream was restarted
    assert stream.cleaning_report["streamed"]["dropped"]["duplicate"] >= 5
    texts = {json.loads(line)["text"] for line in lines}
    seen = {where["text"] for r in rows for name, where, off, n in r.segments if name == "streamed"}
    assert seen == texts  # every document streamed, duplicates removed within an epoch
    # Resume from a JSON state: the half-placed document continues exactly where it stopped.
    k = next(r for r in range(100, 320) if stream.state_at(r)["open"]["ja"] is not None)
    state = json.loads(json.dumps(stream.state_at(k)))
    resumed = build_pretrain_stream(args, smol_tokenizer(), 128 * 4 * 80, 4)
    resumed.load_state_dict(state)
    nxt = next(resumed.global_rows())
    assert nxt.index == k
    open_ja = state["open"]["ja"]
    first_ja = [seg for seg in nxt.segments if seg[0] == "streamed"][0]
    assert first_ja[1]["text"] == open_ja["where"]["text"] and first_ja[2] == open_ja["offset"] > 0
    assert nxt.lang_tokens == rows[k].lang_tokens  # the quota does not depend on the shuffle buffer
