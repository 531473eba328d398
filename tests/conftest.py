"""Shared test fixtures: tiny random models, the shared real data, a private xlt cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The shared real data: $XLT_SHARED_DATA, else the checkout's ../shared/data. Every test reads it through
# shared_file, so a missing file has one behaviour everywhere (see unavailable).
SHARED = Path(os.environ.get("XLT_SHARED_DATA") or REPO.parent / "shared" / "data")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(what: str) -> None:
    """Something a test needs is missing: under ``CI=true`` the test fails with this one line (CI must run
    everything this machine can run); elsewhere it skips with it (shown by ``-rs`` in the summary)."""
    if IN_CI:
        pytest.fail(f"{what} (CI=true: a missing prerequisite fails instead of skipping)", pytrace=False)
    pytest.skip(what)


def shared_file(name: str) -> Path:
    """``$XLT_SHARED_DATA/name``, or the test stops through ``unavailable`` naming the path."""
    path = SHARED / name
    if not path.is_file():
        unavailable(f"shared data {path} not present (set XLT_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def ja_wiki() -> list[str]:
    with open(shared_file("ja_wiki_paragraphs.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@pytest.fixture(scope="session")
def en_text() -> str:
    return shared_file("en_tinyshakespeare.txt").read_text(encoding="utf-8")


def tiny_llama(vocab_size: int, tie: bool = True, seed: int = 0, layers: int = 2, hidden: int = 64):
    """A tiny random Llama (the architecture of the embedded default) for fast tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from xlt.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_tokenizer) -> str:
    """A tiny random Llama with the embedded (real) tokenizer, saved as a model directory."""
    out = tmp_path_factory.mktemp("tiny-model")
    model = tiny_llama(len(embedded_tokenizer))
    model.config.bos_token_id = embedded_tokenizer.bos_token_id
    model.config.eos_token_id = embedded_tokenizer.eos_token_id
    model.config.pad_token_id = embedded_tokenizer.pad_token_id
    model.save_pretrained(out)
    embedded_tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load weights or a tokenizer fails the test: input errors must come first."""
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the input was checked")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", boom)


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
