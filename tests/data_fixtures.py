"""Shared helpers for the data-stream tests: corpora, tokenizers, arguments, a tiny model."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any, Optional

from conftest import SHARED, shared_file

JA_WIKI = SHARED / "ja_wiki_paragraphs.jsonl"  # read through shared_file (one behaviour when missing)
EN_SHAKESPEARE = SHARED / "en_tinyshakespeare.txt"


@cache
def smol_tokenizer():
    from xlt.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def char_tokenizer(texts: list[str], add_bos: bool):
    """A character-level fast tokenizer over the characters of `texts` (small vocab, fast model tests)."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in sorted(set("".join(texts))):
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def shared_sources(holdout: float = 0.0, max_docs: Optional[int] = None) -> list[dict]:
    ja = {"name": "wiki", "lang": "ja", "path": str(shared_file(JA_WIKI.name)), "holdout": holdout}
    en = {"name": "shakespeare", "lang": "en", "path": str(shared_file(EN_SHAKESPEARE.name)), "holdout": holdout}
    if max_docs:
        ja["max_docs"] = en["max_docs"] = max_docs
    return [ja, en]


def write_small_corpus(root: Path, n_ja: int = 40, n_en: int = 40) -> list[dict]:
    """Two small sources of varied document lengths (some longer than a row) from the shared data."""
    ja_docs = [json.loads(line)["text"] for line in shared_file(JA_WIKI.name).read_text(encoding="utf-8").splitlines()[:n_ja]]
    en_blocks = [b for b in shared_file(EN_SHAKESPEARE.name).read_text(encoding="utf-8").split("\n\n") if b.strip()][:n_en]
    ja_docs[3] = "".join(ja_docs[:6])  # one long document: it must continue across rows
    ja_path = root / "ja.jsonl"
    ja_path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in ja_docs), encoding="utf-8")
    en_path = root / "en.txt"
    en_path.write_text("\n\n".join(b.strip("\n") for b in en_blocks) + "\n", encoding="utf-8")
    return [{"name": "ja_small", "lang": "ja", "path": str(ja_path)},
            {"name": "en_small", "lang": "en", "path": str(en_path)}]


def data_args(sources: list[dict], **kw: Any):
    from xlt.config import DataArguments

    base = dict(sources=sources, seq_len=128, ja_schedule="constant", ja_ratio_start=0.5, ja_ratio_end=0.5)
    base.update(kw)
    return DataArguments(**base)


def tiny_llama(vocab_size: int, attn: str = "sdpa", seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.3,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval().float()


def rows_bytes(rows) -> list[bytes]:
    """Rows (dicts of tensors) as bytes, for byte-identical comparisons."""
    return [b"".join(r[k].numpy().tobytes() for k in ("input_ids", "position_ids", "labels")) for r in rows]


def dist_worker(rank: int, world: int, init_file: str, out_dir: str, sources: list[dict], kw: dict,
                total: int, rows_per_step: int, n_rows: int) -> None:
    """One process of the 2-process test: its rows of the global stream, gathered over gloo."""
    import itertools

    import torch.distributed as dist

    from xlt.data.stream import build_pretrain_stream

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        stream = build_pretrain_stream(data_args(sources, **kw), smol_tokenizer(), total, rows_per_step,
                                       rank=rank, world_size=world)
        mine = [(r.index, r.input_ids.tolist(), r.position_ids.tolist(), r.labels.tolist())
                for r in itertools.islice(stream.global_rows(own_only=True), n_rows)]
        via_iter = rows_bytes(list(itertools.islice(iter(stream), 3)))  # the DataLoader path gives the same rows
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {"rows": mine, "iter": via_iter})
        if rank == 0:
            import pickle

            with open(os.path.join(out_dir, "gathered.pkl"), "wb") as f:
                pickle.dump(gathered, f)
        # Both ranks reach this point before either tears gloo down: a rank that exits while its peer
        # still holds the connection can abort the peer ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()

# One case per schedule type, shared by the schedule and mixer tests.
SCHEDULES = {
    "constant": dict(ja_schedule="constant", ja_ratio_start=0.7),
    "linear": dict(ja_schedule="linear", ja_ratio_start=0.2, ja_ratio_end=0.9, ja_ramp_fraction=0.6),
    "step": dict(ja_schedule="step", ja_ratio_start=0.3, ja_ratio_end=0.6, ja_ramp_fraction=0.8),
    "cosine": dict(ja_schedule="cosine", ja_ratio_start=0.1, ja_ratio_end=0.8, ja_ramp_fraction=0.7),
    "piecewise": dict(ja_schedule="piecewise", ja_points="0:0.1,0.25:0.5,0.5:0.5,0.5:0.9,1:0.4"),
}
