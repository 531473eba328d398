"""Shared fixtures of the tokenizer tests: real tokenizers, tiny random models, real shared data."""

from __future__ import annotations

import json
import os
import shutil
from functools import lru_cache
from pathlib import Path

from conftest import SHARED, shared_file

JA_WIKI = SHARED / "ja_wiki_paragraphs.jsonl"  # read through shared_file (one behaviour when missing)
EN_TEXT = SHARED / "en_tinyshakespeare.txt"

ROUND_TRIP = [
    "東京都は日本の首都であり、人口は約1400万人です。",
    "The quick brown fox jumps over the lazy dog.",
    "日本語とEnglishが混ざった文、mixed text です。",
    "絵文字 😀🎌🍣 and 👨‍👩‍👧‍👦 family",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n\tindent",
    "runs   of    spaces      and\n\n\nnewlines ",
    "ｆｕｌｌ－ｗｉｄｔｈ　ＡＢＣ　１２３　ｶﾀｶﾅ",
    "",
    " leading space",
]


@lru_cache(maxsize=1)
def ja_docs() -> tuple[str, ...]:
    with open(shared_file(JA_WIKI.name), encoding="utf-8") as f:
        return tuple(json.loads(line)["text"] for line in f if line.strip())


def ja_split() -> tuple[list[str], list[str]]:
    """90% train, 10% held out (every 10th paragraph)."""
    docs = ja_docs()
    return [d for i, d in enumerate(docs) if i % 10 != 9], [d for i, d in enumerate(docs) if i % 10 == 9]


@lru_cache(maxsize=1)
def en_text() -> str:
    return shared_file(EN_TEXT.name).read_text(encoding="utf-8")


def smollm2_dir() -> str:
    from xlt.models import resolve_model

    return resolve_model("smollm2-135m")


def tiny_model_dir(root: Path, tokenizer_dir: str, tied: bool, vocab_size: int | None = None, seed: int = 0) -> str:
    """A 2-layer, hidden-64 random Llama with the tokenizer files of ``tokenizer_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    ids = list(tj["model"]["vocab"].values()) + [t["id"] for t in tj.get("added_tokens") or []]
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size or max(ids) + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg)
    out = root / f"tiny-{'tied' if tied else 'untied'}"
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if os.path.isfile(os.path.join(tokenizer_dir, f)):
            shutil.copyfile(os.path.join(tokenizer_dir, f), out / f)
    return str(out)


def sentencepiece_bpe_dir(root: Path, vocab_size: int = 2000) -> str:
    """A real SentencePiece BPE with byte fallback (Llama-2 recipe) trained on the shared English
    text, converted to Llama-2's tokenizer.json layout; the slow tokenizer.model is kept beside it."""
    import sentencepiece as spm

    from xlt.tokenizer.spm import tokenizer_json_from_spm

    out = root / "spm-bpe"
    out.mkdir(parents=True, exist_ok=True)
    lines = [ln for ln in en_text().split("\n") if ln.strip()][:20000]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(out / "tokenizer"),
                                   vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
                                   normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    with open(out / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_json_from_spm(str(out / "tokenizer.model")), f, ensure_ascii=False)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    return str(out)
