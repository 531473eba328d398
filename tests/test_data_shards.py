"""``xlt data prepare`` (datatrove token shards) and rows by index from them (xlt/data/prepare.py, shards.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from xlt.cli import main, run_recipe
from xlt.config import DataArguments, XltError
from xlt.data.clean import Cleaner
from xlt.data.packing import IGNORE_INDEX, DocEncoder
from xlt.data.prepare import KEY_FILE, prepare_data, shard_path
from xlt.data.schedule import cumulative_ja_target, seq_len_at
from xlt.data.shards import PreparedData, ShardRows
from xlt.data.sources import load_sources
from xlt.models import resolve_model

SPECS = [{"name": "news", "lang": "ja", "embedded": "hironsan", "holdout": 0.1},
         {"name": "dialogue-ja", "lang": "ja", "embedded": "chatterbot-ja", "holdout": 0.1},
         {"name": "dialogue-en", "lang": "en", "embedded": "chatterbot-en", "holdout": 0.05}]
SHARD_BYTES = 40_000  # small shards: two or more per source, so the tasks really run apart


def _args(**kw) -> DataArguments:
    base = dict(sources=SPECS, seq_len=128, slw_min_len=32, slw_fraction=0.3, ja_schedule="linear",
                ja_ratio_start=0.5, ja_ratio_end=0.8, stream_seed=3)
    return DataArguments(**{**base, **kw})


def _prepare(out, tokenizer, args=None, processes=1) -> dict:
    args = args or _args()
    return prepare_data(load_sources(args.sources), args, tokenizer, resolve_model("smollm2-135m"),
                        str(out), processes=processes, shard_bytes=SHARD_BYTES)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, embedded_tokenizer):
    out = tmp_path_factory.mktemp("prepared") / "data"
    return str(out), _prepare(out, embedded_tokenizer)


def test_prepare_keeps_cleaned_training_documents_deduplicated_across_sources(prepared, embedded_tokenizer):
    out, summary = prepared
    args, encoder = _args(), DocEncoder(embedded_tokenizer)
    seen, expect_docs, expect_tokens, first = set(), {}, {}, {}
    for s in load_sources(SPECS):
        cleaner = Cleaner(s.lang, args)
        cleaner.seen = seen  # one exact-dedup set across the sources, in recipe order
        kept = [t for t in map(cleaner, s.split_holdout()[0]) if t is not None]
        expect_docs[s.name], first[s.name] = len(kept), kept[0]
        expect_tokens[s.name] = sum(len(t) for t in encoder.encode(kept))
        assert summary["dropped"][s.name] == cleaner.report()["dropped"]
    assert summary["documents"] == expect_docs and summary["tokens"] == expect_tokens
    assert summary["shards"] > len(SPECS)  # several shards per source
    data = PreparedData(out)
    for name, text in first.items():  # the token files hold xlt's conventions (BOS only if added, EOS after)
        n = int(data.docs[name][2][0])
        assert np.array_equal(data.tokens(name, 0, 0, n), encoder.encode([text])[0])


def test_killed_prepare_reruns_only_unfinished_shards(prepared, tmp_path, embedded_tokenizer):
    src, summary = prepared
    out = tmp_path / "data"
    shutil.copytree(src, out)
    victim = shard_path(str(out), "news", 1)
    # What a SIGKILL in task 1 leaves: no completion mark for it (nor for dedup), truncated token and index files.
    os.remove(out / "logs" / "tokenize" / "completions" / "00001")
    os.remove(out / "logs" / "tokenize" / "completions" / "00004")
    shutil.rmtree(out / "logs" / "dedup" / "completions")
    os.remove(out / "prepared.json")
    for suffix in (".ds", ".ds.index"):
        with open(victim + suffix, "r+b") as f:
            f.truncate(os.path.getsize(victim + suffix) // 3)
    untouched = shard_path(str(out), "news", 0) + ".ds"
    mtime, files = os.stat(untouched).st_mtime_ns, sorted(os.listdir(out / "shards" / "news"))
    again = _prepare(out, embedded_tokenizer, processes=2)  # the rerun on 2 worker processes
    assert {k: again[k] for k in ("documents", "tokens", "dropped", "shards")} == \
        {k: summary[k] for k in ("documents", "tokens", "dropped", "shards")}
    assert os.stat(untouched).st_mtime_ns == mtime  # completed tasks were not rerun
    assert sorted(os.listdir(out / "shards" / "news")) == files  # no duplicate shard files
    assert filecmp_equal(victim + ".ds", os.path.join(src, "shards", "news", "00001.ds"))


def filecmp_equal(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def test_prepared_data_of_other_settings_is_refused_in_one_line(prepared, tmp_path, embedded_tokenizer):
    out = tmp_path / "data"
    shutil.copytree(prepared[0], out)
    with pytest.raises(XltError) as e:
        _prepare(out, embedded_tokenizer, _args(clean_min_chars=20))
    assert "\n" not in str(e.value) and "other settings (clean)" in str(e.value)
    assert json.loads((out / KEY_FILE).read_text())["clean"]["clean_min_chars"] == 1  # nothing was mixed


@pytest.mark.parametrize("case", ["binary", "missing_field", "unwritable"])
def test_bad_input_to_prepare_is_one_line_before_any_work(case, tmp_path, capsys, no_model_loading):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "日本語の文書です。"}\n', encoding="utf-8")
    out = tmp_path / "out"
    if case == "binary":
        data.write_bytes(b"\x00\x01\x02\xff\xfe" * 100)
    elif case == "missing_field":
        data.write_text('{"body": "日本語の文書です。"}\n', encoding="utf-8")
    else:
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "sub"
    recipe = tmp_path / "cpt.yaml"
    recipe.write_text(f"model: smollm2-135m\ntokenizer_mode: none\noutput_dir: {tmp_path / 'run'}\n"
                      f"sources:\n  - {{name: docs, lang: ja, path: {data}}}\nja_ratio_start: 1.0\nja_ratio_end: 1.0\n"
                      f"use_cpu: true\n", encoding="utf-8")
    assert main(["data", "prepare", "--config", str(recipe), "--output_dir", str(out), "--json"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and err.count("\n") == 0 and err.startswith("xlt: error:")
    assert {"binary": "docs.jsonl", "missing_field": "'text'", "unwritable": "--output_dir"}[case] in err
    assert not os.path.exists(tmp_path / "run" / "tokenizer")


def _rows(prepared_dir: str, rows_per_step: int = 4, total: int = 128 * 4 * 40) -> ShardRows:
    return ShardRows(PreparedData(prepared_dir), _args(), total, rows_per_step,
                     {"news": 0.7, "dialogue-ja": 0.3, "dialogue-en": 1.0})


def test_ranks_build_disjoint_rows_whose_union_is_the_single_process_rows(prepared):
    one, ranks = _rows(prepared[0]), [_rows(prepared[0]), _rows(prepared[0])]  # separate processes' objects
    for step in (0, 7, 39):
        mine = [ranks[r].rank_rows(step, r, 2) for r in range(2)]
        assert not set(mine[0]) & set(mine[1])
        assert sorted(mine[0] + mine[1]) == one.rank_rows(step, 0, 1)
        for r in range(2):
            for g in mine[r]:
                a, b = ranks[r].row(g), one.row(g)
                assert all(np.array_equal(a[k], b[k]) for k in a)


def test_japanese_share_per_step_follows_the_schedule_and_rows_never_cross_documents(prepared, embedded_tokenizer):
    rows, args, eos = _rows(prepared[0]), _args(), embedded_tokenizer.eos_token_id
    step_tokens, total, cum_ja = 4 * 128, 128 * 4 * 40, 0
    for step in range(40):
        ja = 0
        for g in rows.rank_rows(step, 0, 1):
            row = rows.row(g)
            ja += int((row["langs"] == 0).sum())
            starts = np.flatnonzero(row["position_ids"] == 0)
            assert list(starts) == list(np.flatnonzero(row["labels"] == IGNORE_INDEX))
            warm = seq_len_at(g * 128, total, args)
            for a, b in zip(starts, list(starts[1:]) + [128]):
                seg = row["input_ids"][a:b]
                assert not (seg[:-1] == eos).any()  # a segment is one document's piece: EOS only at its end
                assert a // warm == (b - 1) // warm  # and inside one warmup sub-row
        cum_ja += ja
        c0 = cumulative_ja_target(step * step_tokens, total, args)
        c1 = cumulative_ja_target((step + 1) * step_tokens, total, args)
        assert abs(ja / step_tokens - (c1 - c0) / step_tokens) <= 1 / step_tokens
        assert abs(cum_ja / ((step + 1) * step_tokens) - c1 / ((step + 1) * step_tokens)) <= 0.005
    acc = rows.accounting(40)
    assert acc["tokens_trained"]["ja"] == cum_ja and sum(acc["tokens_by_source"].values()) == 40 * step_tokens


def test_preview_on_shards_shows_what_their_rows_place(prepared):
    """``xlt data preview`` of a recipe on shards (no data read): each step's Japanese share and warmup length
    are those of the rows continued pretraining builds."""
    from xlt.data.preview import preview

    rows, args, step_tokens = _rows(prepared[0]), _args(), 4 * 128
    shown = preview(args, None, 128 * 4 * 40, 4, 40)
    for step, r in enumerate(shown):
        built = [rows.row(g) for g in rows.rank_rows(step, 0, 1)]
        assert r["realised_ja"] * step_tokens == sum(int((b["langs"] == 0).sum()) for b in built)
        starts = set(np.flatnonzero(built[0]["position_ids"] == 0).tolist())  # every warmup sub-row starts one
        assert set(range(0, 128, r["seq_len"])) <= starts


def test_resume_is_an_index_a_fresh_reader_builds_the_same_rows(prepared):
    first = _rows(prepared[0])
    sequence = [first.row(g) for g in range(160)]
    resumed = _rows(prepared[0])  # a relaunch: new objects, no state but the step number
    for g in range(100, 160):
        assert all(np.array_equal(resumed.row(g)[k], sequence[g][k]) for k in sequence[g])


# ---------------------------------------------------------------------------------------------------------
# Continued pretraining on the shards (data_source: shards)
# ---------------------------------------------------------------------------------------------------------
CPT = str(REPO / "recipes/smollm2-135m-ja/cpt.yaml")


def cpt_args(model: str, out: str, *extra: str) -> list[str]:
    return ["--config", CPT, "--model", model, "--output_dir", out, "--tokenizer_mode", "none", "--data_source",
            "shards", "--train_tokens", "4096", "--save_steps", "2", "--logging_steps", "1", "--eval_max_docs", "8",
            *extra]


def _report(out: str) -> dict:
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        return json.load(f)


def test_cpt_prepares_missing_shards_then_trains_the_schedule_from_them(tmp_path, tiny_model_dir, capsys):
    out = str(tmp_path / "run")
    assert run_recipe("cpt", cpt_args(tiny_model_dir, out, "--save_steps", "100")) == 0
    assert "data: preparing token shards in" in capsys.readouterr().out
    report = _report(out)
    assert report["data"]["tokens_read_per_rank"] == [4096]  # 4 steps x 4 rows x 256 tokens, all read by rank 0
    assert report["data"]["prepared"]["shards"] == 3
    acc = report["cpt"]["accounting"]
    assert acc["tokens_trained"] == acc["target_tokens"] and sum(acc["tokens_by_source"].values()) == 4096
    state = json.load(open(os.path.join(out, "checkpoint-4", "trainer_state.json"), encoding="utf-8"))
    for r in [r for r in state["log_history"] if "loss" in r]:  # every step: realised = the schedule's integral
        assert abs(r["ja_share_cum"] - r["ja_share_cum_target"]) <= 0.005
    # A second run into another directory reuses nothing; one with other cleaning is refused in one line.
    again = str(tmp_path / "again")
    assert run_recipe("cpt", cpt_args(tiny_model_dir, again, "--prepared_dir", os.path.join(out, "data"),
                                      "--clean_min_chars", "30")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "other settings (clean)" in err


def test_two_processes_read_disjoint_halves_and_train_like_one(tmp_path, tiny_model_dir):
    """torchrun, 2 gloo processes x batch 2 = 1 process x batch 4 on the shards: each rank read half the rows,
    the same tokens were trained, the same weights came out."""
    from safetensors.torch import load_file

    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = ["--save_steps", "100", "--logging_steps", "2"]
    assert run_recipe("cpt", cpt_args(tiny_model_dir, one, *common, "--per_device_train_batch_size", "4")) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29547", str(REPO / "recipes/cpt.py"),
                           *cpt_args(tiny_model_dir, two, *common, "--per_device_train_batch_size", "2")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r1, r2 = _report(one), _report(two)
    assert r1["data"]["tokens_read_per_rank"] == [4096] and r2["data"]["tokens_read_per_rank"] == [2048, 2048]
    assert r1["tokens_trained"] == r2["tokens_trained"]
    assert r1["cpt"]["accounting"] == r2["cpt"]["accounting"]
    a, b = load_file(os.path.join(one, "cpt", "model.safetensors")), load_file(os.path.join(two, "cpt", "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_sigkill_mid_step_then_relaunch_on_shards_matches_an_uninterrupted_run(tmp_path, tiny_model_dir):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    assert run_recipe("cpt", cpt_args(tiny_model_dir, full)) == 0
    # Killed during step 4 (after its backward, before its optimizer step): the relaunch resumes at checkpoint-2.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(REPO / "tests/scale_launch.py"), "cpt_sigkill", "3", "--",
                           *cpt_args(tiny_model_dir, killed)], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not os.path.exists(os.path.join(killed, "cpt"))
    assert run_recipe("cpt", cpt_args(tiny_model_dir, killed)) == 0
    from safetensors.torch import load_file

    a = load_file(os.path.join(full, "cpt", "model.safetensors"))
    b = load_file(os.path.join(killed, "cpt", "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    ra, rb = _report(full), _report(killed)
    assert ra["tokens_trained"] == rb["tokens_trained"] and ra["cpt"]["accounting"] == rb["cpt"]["accounting"]
    assert ra["data"]["tokens_read_per_rank"] == rb["data"]["tokens_read_per_rank"] == [4096]


def test_prepare_command_json_then_cpt_reuses_its_shards(tmp_path, tiny_model_dir, capsys):
    recipe = tmp_path / "cpt.yaml"
    text = open(CPT, encoding="utf-8").read().replace("output_dir: runs/smollm2-135m-ja", f"output_dir: {tmp_path / 'run'}")
    recipe.write_text(text.replace("tokenizer_mode: extend", "tokenizer_mode: none"), encoding="utf-8")
    assert main(["data", "prepare", "--config", str(recipe), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    summary = json.loads(out[0])
    assert list(summary) == ["documents", "tokens", "dropped", "shards", "seconds"]
    assert set(summary["documents"]) == {"hironsan", "chatterbot-ja", "chatterbot-en"} and summary["shards"] == 3
    stamp = os.stat(tmp_path / "run" / "data" / "prepared.json").st_mtime_ns
    assert run_recipe("cpt", ["--config", str(recipe), "--model", tiny_model_dir,  # the shipped recipe's data_source
                              "--train_tokens", "1024", "--save_steps", "100", "--eval_max_docs", "8"]) == 0
    assert "data: reusing the token shards in" in capsys.readouterr().out
    assert os.stat(tmp_path / "run" / "data" / "prepared.json").st_mtime_ns == stamp
    assert _report(str(tmp_path / "run"))["data"]["prepared"]["tokens"] == summary["tokens"]


def test_dataloader_workers_build_the_same_rows_in_the_same_order(tmp_path, tiny_model_dir):
    """Rows by index may be built in DataLoader workers (reading overlaps compute): same weights as in-process."""
    from safetensors.torch import load_file

    runs = {}
    for workers in ("0", "2"):
        out = str(tmp_path / f"w{workers}")
        assert run_recipe("cpt", cpt_args(tiny_model_dir, out, "--train_tokens", "2048", "--save_steps", "100",
                                          "--dataloader_num_workers", workers)) == 0
        runs[workers] = (load_file(os.path.join(out, "cpt", "model.safetensors")), _report(out))
    for k in runs["0"][0]:
        torch.testing.assert_close(runs["0"][0][k], runs["2"][0][k], rtol=0, atol=0)
    assert runs["0"][1]["cpt"]["accounting"] == runs["2"][1]["cpt"]["accounting"]
    # Read in the workers, counted in the rank: each worker's rows summed.
    assert runs["0"][1]["data"]["tokens_read_per_rank"] == runs["2"][1]["data"]["tokens_read_per_rank"] == [2048]


def test_a_streamed_dataset_is_prepared_one_task_per_file(tmp_path, embedded_tokenizer, ja_wiki):
    """A ``dataset:`` source (streamed with datasets, here a local folder of 2 parquet files, offline as the hub's)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "ds"
    folder.mkdir()
    docs = ja_wiki[:40]
    for i in range(2):
        pq.write_table(pa.table({"text": docs[i * 20:(i + 1) * 20]}), folder / f"part-{i}.parquet")
    args = _args(sources=[{"name": "wiki", "lang": "ja", "dataset": str(folder)},
                          {"name": "dialogue-en", "lang": "en", "embedded": "chatterbot-en"}])
    summary = _prepare(tmp_path / "data", embedded_tokenizer, args)
    shards = sorted(f for f in os.listdir(tmp_path / "data" / "shards" / "wiki") if f.endswith(".ds"))
    assert shards == ["00000.ds", "00001.ds"]  # one task per parquet file
    encoder = DocEncoder(embedded_tokenizer)
    assert summary["documents"]["wiki"] == len(set(docs))
    assert summary["tokens"]["wiki"] == sum(len(t) for t in encoder.encode(list(dict.fromkeys(docs))))
