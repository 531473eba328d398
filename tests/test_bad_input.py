"""Bad recipe input (issue 7): one ``xlt: error:`` line, exit 2, before any model or tokenizer loads.

Every case here ended in a traceback, an argparse usage dump, or a model load before the checks of
``xlt/validate.py`` (run against the code before them: see the commit message).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
import tempfile

import pytest
import yaml

from conftest import REPO, unavailable
from xlt.cli import main, run_recipe

RECIPES = REPO / "recipes/smollm2-135m-ja"
EN = {"name": "en", "lang": "en", "embedded": "chatterbot-en"}


def run_stage(tmp_path, capsys, stage: str, changes: dict, extra: tuple = ()) -> tuple[int, str]:
    """Run a stage on its smollm2 recipe with ``changes``; output_dir defaults to a fresh folder in tmp_path."""
    data = yaml.safe_load((RECIPES / f"{stage}.yaml").read_text(encoding="utf-8"))
    data["output_dir"] = str(tmp_path / "run")
    if stage == "sft":
        data["model"] = "smollm2-135m"  # no cpt model needed to reach the model load
    if stage == "evaluate":  # a run directory with a held-out split, as continued pretraining leaves it
        (tmp_path / "run" / "heldout").mkdir(parents=True)
        (tmp_path / "run" / "heldout" / "ja.jsonl").write_text('{"text": "日本語の文です。"}\n', encoding="utf-8")
    data.update(changes)
    path = tmp_path / f"{stage}-recipe.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    argv = ["--config", str(path), *extra]
    if stage == "tokenizer":
        rc = run_recipe("extend_tokenizer", argv)  # recipes/extend_tokenizer.py
    else:
        rc = main({"cpt": ["cpt"], "sft": ["sft"], "evaluate": ["evaluate", "run"]}[stage] + argv)
    return rc, capsys.readouterr().err.strip()


def assert_one_line(rc: int, err: str, *named: str) -> None:
    """Exit 2, one ``xlt: error:`` line last on stderr (a library's own FutureWarning may precede it), no traceback."""
    assert rc == 2, err
    lines = err.splitlines()
    assert [x for x in lines if x.startswith("xlt: error")] == lines[-1:] and "Traceback" not in err, err
    for s in named:
        assert s in lines[-1], err


def src(path, **kw) -> list[dict]:
    return [dict(name="f", lang="ja", path=str(path), **kw), EN]


# ---------------------------------------------------------------------------------------------
# Wrong value types and out-of-range numbers
# ---------------------------------------------------------------------------------------------
VALUE_CASES = [
    # (stage, changes, extra argv, expected text)
    ("cpt", {"learning_rate": [1, 2]}, (), "learning_rate: expected a number, got a list [1, 2]"),
    ("cpt", {"learning_rate": "fast"}, (), "learning_rate: expected a number, got a string 'fast'"),
    ("cpt", {"learning_rate": -1e-4}, (), "learning_rate=-0.0001 must be > 0"),
    ("cpt", {"learning_rate": 0}, (), "learning_rate=0 must be > 0"),
    ("cpt", {"per_device_train_batch_size": [4, 8]}, (), "per_device_train_batch_size: expected an integer, got a list [4, 8]"),
    ("cpt", {"per_device_train_batch_size": 2.5}, (), "per_device_train_batch_size: expected an integer, got a number 2.5"),
    ("cpt", {"per_device_train_batch_size": 0}, (), "per_device_train_batch_size=0 must be > 0"),
    ("cpt", {"per_device_train_batch_size": -2}, (), "per_device_train_batch_size=-2 must be > 0"),
    ("cpt", {"gradient_accumulation_steps": 0}, (), "gradient_accumulation_steps=0 must be > 0"),
    ("cpt", {"save_steps": 0}, (), "save_steps=0 must be > 0"),
    ("cpt", {"save_steps": -5}, (), "save_steps=-5 must be > 0"),
    ("cpt", {"max_steps": -5}, (), "max_steps=-5 must be > 0 (or -1: unset)"),
    ("cpt", {"weight_decay": -0.1}, (), "weight_decay=-0.1 must be >= 0"),
    ("cpt", {"adam_beta1": 1.0}, (), "adam_beta1=1.0 must be in [0, 1)"),
    ("cpt", {"adam_beta2": -0.5}, (), "adam_beta2=-0.5 must be in [0, 1)"),
    ("cpt", {"adam_epsilon": -1e-8}, (), "adam_epsilon=-1e-08 must be >= 0"),
    ("cpt", {"max_grad_norm": -1.0}, (), "max_grad_norm=-1.0 must be >= 0"),
    ("cpt", {"save_total_limit": -1}, (), "save_total_limit=-1 must be >= 0"),
    ("cpt", {"dataloader_num_workers": -1}, (), "dataloader_num_workers=-1 must be >= 0"),
    ("cpt", {"bf16": "maybe"}, (), "bf16: expected true or false, got a string 'maybe'"),
    ("cpt", {"use_cpu": [True]}, (), "use_cpu: expected true or false, got a list [True]"),
    ("cpt", {"seed": "abc"}, (), "seed: expected an integer, got a string 'abc'"),
    ("cpt", {"seq_len": [256]}, (), "seq_len: expected an integer, got a list [256]"),
    ("cpt", {"seq_len": "long"}, (), "seq_len: expected an integer, got a string 'long'"),
    ("cpt", {"new_tokens": [1]}, (), "new_tokens: expected an integer, got a list [1]"),
    ("cpt", {"ja_ratio_start": [0.5]}, (), "ja_ratio_start: expected a number, got a list [0.5]"),
    ("cpt", {"ja_ramp_fraction": "x"}, (), "ja_ramp_fraction: expected a number, got a string 'x'"),
    ("cpt", {"clean_nfkc": "perhaps"}, (), "clean_nfkc: expected true or false, got a string 'perhaps'"),
    ("cpt", {"clean_dedup": 3}, (), "clean_dedup: expected true or false, got an integer 3"),
    ("cpt", {"max_epochs_warning": -1}, (), "max_epochs_warning=-1 must be > 0"),
    ("cpt", {"clean_min_chars": -1}, (), "clean_min_chars=-1 must be >= 0"),
    ("cpt", {"clean_min_ja_share": 2}, (), "clean_min_ja_share=2 is outside [0, 1]"),
    ("cpt", {"stream_seed": -1}, (), "stream_seed=-1 must be in [0, 2**32)"),
    ("cpt", {"stream_seed": [1]}, (), "stream_seed: expected an integer, got a list [1]"),
    ("cpt", {"train_tokens": -100}, (), "train_tokens=-100 must be > 0"),
    ("cpt", {"train_tokens": "1B"}, (), "train_tokens: expected an integer, got a string '1B'"),
    ("cpt", {"spike_factor": -1}, (), "spike_factor=-1 must be 0 (off) or > 1"),
    ("cpt", {"spike_factor": 0.5}, (), "spike_factor=0.5 must be 0 (off) or > 1"),
    ("cpt", {"eval_max_docs": 0}, (), "eval_max_docs=0 must be > 0"),
    ("cpt", {"resume": "nope"}, (), "resume: expected true or false, got a string 'nope'"),
    ("cpt", {"model": ["smollm2-135m"]}, (), "model: expected a string, got a list ['smollm2-135m']"),
    ("cpt", {"trust_remote_code": "sure"}, (), "trust_remote_code: expected true or false, got a string 'sure'"),
    ("cpt", {"sources": "hironsan"}, (), "sources: expected a list of mappings, got a string 'hironsan'"),
    # source specs: fields of the wrong type
    ("cpt", {"sources": [dict(name="h", lang="ja", embedded="hironsan", weight="heavy"), EN]}, (),
     "sources[0]: weight: expected a number, got a string 'heavy'"),
    ("cpt", {"sources": [dict(name="h", lang="ja", embedded="hironsan", weight=[1]), EN]}, (),
     "sources[0]: weight: expected a number, got a list [1]"),
    ("cpt", {"sources": [dict(name="h", lang="ja", embedded="hironsan", holdout="x"), EN]}, (),
     "sources[0]: holdout: expected a number, got a string 'x'"),
    ("cpt", {"sources": [dict(name="h", lang="ja", embedded="hironsan", max_docs="ten"), EN]}, (),
     "sources[0]: max_docs: expected an integer, got a string 'ten'"),
    ("cpt", {"sources": [dict(name="h", lang="ja", embedded="hironsan", max_docs=2.5), EN]}, (),
     "sources[0]: max_docs: expected an integer, got a number 2.5"),
    ("cpt", {"sources": [dict(name="h", lang="ja", embedded="hironsan", max_docs=-1), EN]}, (),
     "sources[0]: max_docs=-1 must be >= 1"),
    ("cpt", {"sources": [dict(name=["h"], lang="ja", embedded="hironsan"), EN]}, (),
     "sources[0]: name: expected a string, got a list ['h']"),
    ("cpt", {"sources": [dict(name="h", lang="ja", path=["a.jsonl"]), EN]}, (),
     "sources[0]: path: expected a string, got a list ['a.jsonl']"),
    ("cpt", {"sources": [dict(name="h", lang="ja", embedded=["hironsan"]), EN]}, (),
     "sources[0]: embedded: expected a string, got a list ['hironsan']"),
    ("cpt", {"sources": [dict(name="h", lang="ja", embedded="hironsan", domain=[1]), EN]}, (),
     "sources[0]: domain: expected a string, got a list [1]"),
    ("cpt", {"sources": [dict(name="h", lang="ja", embedded="hironsan", weight=True), EN]}, (),
     "sources[0]: weight: expected a number, got a boolean True"),
    ("cpt", {"sources": [dict(name="h", lang="ja", embedded="hironsan", text_field=3), EN]}, (),
     "sources[0]: text_field: expected a string, got an integer 3"),
    # command-line overrides
    ("cpt", {}, ("--learning_rate", "abc"), "--learning_rate/--learning-rate: invalid float value: 'abc'"),
    ("cpt", {}, ("--learning_rate", "-1"), "learning_rate=-1.0 must be > 0"),
    ("cpt", {}, ("--per_device_train_batch_size", "0"), "per_device_train_batch_size=0 must be > 0"),
    # SFT
    ("sft", {"sft_datasets": {"adapter": "chatterbot", "embedded": "chatterbot-ja"}}, (),
     "sft_datasets: expected a list of mappings, got a mapping"),
    ("sft", {"sft_datasets": [{"adapter": "chatterbot", "embedded": "chatterbot-ja", "max_examples": "all"}]}, (),
     "sft_datasets[0]: max_examples: expected an integer, got a string 'all'"),
    ("sft", {"sft_datasets": [{"adapter": "chatterbot", "embedded": "chatterbot-ja", "max_examples": -1}]}, (),
     "sft_datasets[0]: max_examples=-1 must be >= 1"),
    ("sft", {"sft_datasets": [{"adapter": "alpaca", "path": ["x.jsonl"]}]}, (),
     "sft_datasets[0]: path: expected a string, got a list ['x.jsonl']"),
    ("sft", {"sft_datasets": [{"adapter": "chatterbot", "embedded": "chatterbot-ja", "split": 3}]}, (),
     "sft_datasets[0]: split: expected a string, got an integer 3"),
    ("sft", {"max_length": 0}, (), "max_length=0 must be > 0"),
    ("sft", {"max_length": [256]}, (), "max_length: expected an integer, got a list [256]"),
    ("sft", {"learning_rate": -1}, (), "learning_rate=-1 must be > 0"),
    ("sft", {"num_train_epochs": -1}, (), "num_train_epochs=-1 must be > 0"),
    ("sft", {"model": ["smollm2-135m"]}, (), "model: expected a string, got a list ['smollm2-135m']"),
    # evaluate
    ("evaluate", {"eval_max_length": 0}, (), "eval_max_length=0 must be > 0"),
    ("evaluate", {"max_new_tokens": -1}, (), "max_new_tokens=-1 must be > 0"),
    ("evaluate", {"eval_max_docs": [1]}, (), "eval_max_docs: expected an integer, got a list [1]"),
    ("evaluate", {"generate_prompt": ["x"]}, (), "generate_prompt: expected a string, got a list ['x']"),
    # the tokenizer stage
    ("tokenizer", {"new_tokens": [1]}, (), "new_tokens: expected an integer, got a list [1]"),
    ("tokenizer", {"tokenizer_max_chars": -1}, (), "tokenizer_max_chars=-1 must be > 0"),
]


@pytest.mark.parametrize("stage,changes,extra,message", VALUE_CASES,
                         ids=[f"{c[0]}-{c[3].split(':')[0].split('=')[0]}-{i}" for i, c in enumerate(VALUE_CASES)])
def test_bad_value(tmp_path, capsys, no_model_loading, stage, changes, extra, message):
    rc, err = run_stage(tmp_path, capsys, stage, changes, extra)
    assert_one_line(rc, err, message)


# ---------------------------------------------------------------------------------------------
# Data files that are binary or not UTF-8
# ---------------------------------------------------------------------------------------------
def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def binary_jsonl(d):
    return _write(d / "bin.jsonl", b"\x00\x01\x02PK\x03\x04" + bytes(range(256)) * 4), "bin.jsonl:1: binary data"


def _row(text: str) -> bytes:
    """A jsonl line valid both as a source document and as an Alpaca instruction example."""
    return json.dumps({"text": text, "instruction": text, "output": text}, ensure_ascii=False).encode() + b"\n"


def latin1_jsonl(d):
    return _write(d / "latin1.jsonl", _row("日本") + _row("café").replace("é".encode(), b"\xe9")), \
        "latin1.jsonl:2: not UTF-8 text (byte 0xe9)"


def latin1_past_head(d):
    """A bad byte after the first MiB: the cheap head check passes, the full read names the line."""
    good = _row("日本語の段落です。" * 20)
    n = (1 << 20) // len(good) + 10
    return _write(d / "late.jsonl", good * n + _row("café").replace("é".encode(), b"\xe9")), \
        f"late.jsonl:{n + 1}: not UTF-8 text"


def png_txt(d):
    return _write(d / "image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))), "image.txt:"


def shift_jis_txt(d):
    return _write(d / "sjis.txt", b"first paragraph\n\n" + "日本語".encode("shift_jis")), \
        "sjis.txt:3: not UTF-8 text"


def not_parquet(d):
    return _write(d / "fake.parquet", b"just some text\n"), "fake.parquet is not a readable parquet file"


FILES = {f.__name__: f for f in (binary_jsonl, latin1_jsonl, latin1_past_head, png_txt, shift_jis_txt, not_parquet)}
FILE_CASES = [("cpt", "sources", name) for name in FILES] + [
    ("cpt", "eval_sources", "binary_jsonl"), ("cpt", "eval_sources", "latin1_jsonl"),
    ("cpt", "tokenizer_corpus", "binary_jsonl"), ("cpt", "tokenizer_corpus", "shift_jis_txt"),
    ("tokenizer", "sources", "binary_jsonl"), ("tokenizer", "sources", "not_parquet"),
    ("sft", "sft_datasets", "binary_jsonl"), ("sft", "sft_datasets", "latin1_jsonl"),
    ("sft", "sft_datasets", "latin1_past_head"),
]


@pytest.mark.parametrize("stage,key,kind", FILE_CASES, ids=[f"{s}-{k}-{f}" for s, k, f in FILE_CASES])
def test_bad_data_file(tmp_path, capsys, no_model_loading, stage, key, kind):
    path, message = FILES[kind](tmp_path)
    if key == "sft_datasets":
        changes = {key: [{"adapter": "alpaca", "path": str(path)}]}
    elif key == "sources":
        changes = {key: src(path)}
    else:
        changes = {key: [dict(name="f", lang="ja", path=str(path))]}
    rc, err = run_stage(tmp_path, capsys, stage, changes)
    assert_one_line(rc, err, f"{key}[0]: ", str(tmp_path), message)


# ---------------------------------------------------------------------------------------------
# Output directories that cannot be used
# ---------------------------------------------------------------------------------------------
def _file(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    return f


OUT_CASES = [
    ("cpt", lambda t: _file(t) / "run", "cannot be created: {t}/a-file is a file"),
    ("cpt", lambda t: _file(t), "output_dir={t}/a-file is a file, not a directory"),
    ("sft", lambda t: _file(t) / "run", "cannot be created: {t}/a-file is a file"),
    ("tokenizer", lambda t: _file(t) / "run", "cannot be created: {t}/a-file is a file"),
    ("evaluate", lambda t: _file(t), "output_dir={t}/a-file is a file, not a directory"),
]


@pytest.mark.parametrize("stage,make,message", OUT_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(OUT_CASES)])
def test_unusable_output_dir(tmp_path, capsys, no_model_loading, stage, make, message):
    rc, err = run_stage(tmp_path, capsys, stage, {"output_dir": str(make(tmp_path))})
    assert_one_line(rc, err, message.format(t=tmp_path))


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/proc/self"), reason="needs /proc")
@pytest.mark.parametrize("stage", ["cpt", "sft"])
def test_output_dir_on_a_read_only_file_system(tmp_path, capsys, no_model_loading, stage):
    rc, err = run_stage(tmp_path, capsys, stage, {"output_dir": "/proc/xlt-run"})
    assert_one_line(rc, err, "output_dir=/proc/xlt-run cannot be created: /proc is not writable")


def _writable(path) -> bool:
    try:
        os.rmdir(tempfile.mkdtemp(dir=path))
    except OSError:
        return False
    return True


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_CAP_V3, _CAP_DAC_OVERRIDE = 0x20080522, 1  # <linux/capability.h>


@contextlib.contextmanager
def permission_bits_bind_root():
    """Root with CAP_DAC_OVERRIDE off in this thread's effective set: write permission bits bind it (reads are
    unaffected). capget / capset through libc: the standard library has no wrapper. The capability stays in the
    permitted set, so it is raised again on exit."""
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(_CAP_V3, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    saved = data[0].effective
    data[0].effective &= ~(1 << _CAP_DAC_OVERRIDE)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    try:
        yield
    finally:
        data[0].effective = saved
        if libc.capset(ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), "capset failed restoring CAP_DAC_OVERRIDE")


@contextlib.contextmanager
def read_only_dir(path):
    """``path`` made unwritable for this process by its permission bits (chmod 555); as root, whom the bits do not
    bind, with CAP_DAC_OVERRIDE dropped meanwhile (on any file system, unlike ``chattr +i``). Stops through
    ``unavailable`` when the bits still do not bind."""
    path.mkdir()
    path.chmod(0o555)
    try:
        with permission_bits_bind_root() if os.geteuid() == 0 else contextlib.nullcontext():
            if _writable(path):
                unavailable(f"{path} is still writable after chmod 555")
            yield path
    finally:
        path.chmod(0o755)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_output_dir_under_a_read_only_parent(tmp_path, capsys, no_model_loading):
    with read_only_dir(tmp_path / "ro") as parent:
        rc, err = run_stage(tmp_path, capsys, "cpt", {"output_dir": str(parent / "run")})
        assert list(parent.iterdir()) == []  # the write probe leaves nothing behind
    assert_one_line(rc, err, f"cannot be created: {parent} is not writable")


def test_valid_recipes_still_parse(tmp_path):
    """Every shipped recipe passes the new checks (GPU recipes with bf16 off, as on this CPU)."""
    from transformers import TrainingArguments
    from trl import SFTConfig

    from xlt.config import (
        CptArguments,
        DataArguments,
        EvalArguments,
        ModelArguments,
        OutputArguments,
        SftArguments,
        TokenizerArguments,
        parse_recipe,
    )

    kinds = {"cpt": [ModelArguments, TokenizerArguments, DataArguments, CptArguments, TrainingArguments],
             "sft": [SftArguments, SFTConfig], "evaluate": [EvalArguments],
             "tokenizer": [ModelArguments, TokenizerArguments, DataArguments, CptArguments, OutputArguments]}
    recipes = sorted((REPO / "recipes").glob("*/*.yaml"))
    assert len(recipes) >= 16
    for path in recipes:
        stage = path.stem
        if stage.startswith("compare"):  # comparison files, not stage recipes: test_compare*.py load them
            continue
        extra = ["--bf16", "false"] if stage in ("cpt", "sft") else []
        parse_recipe(kinds[stage], ["--config", str(path), "--output_dir", str(tmp_path / stage), *extra])


def test_utf8_check_across_chunk_boundaries(tmp_path):
    """The chunked whole-file check (SFT files) keeps characters cut by a chunk edge and counts lines right."""
    from xlt.config import XltError
    from xlt.validate import check_utf8_file

    good = tmp_path / "good.jsonl"
    good.write_text("日本語\n" * 50, encoding="utf-8")
    for chunk in (1, 2, 4, 5, 7):
        check_utf8_file(str(good), "k", chunk=chunk)
    bad = _write(tmp_path / "bad.jsonl", "日本語\n日本\n".encode() + b"ok \xe9\n")
    for chunk in (1, 3, 4, 1 << 20):
        with pytest.raises(XltError, match=r"^k: .*bad.jsonl:3: not UTF-8 text \(byte 0xe9\)"):
            check_utf8_file(str(bad), "k", chunk=chunk)
