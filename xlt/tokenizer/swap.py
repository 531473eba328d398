"""Swap: a byte-level BPE trained fresh on the user's Japanese + English corpus replaces the old one.

The new tokenizer keeps the base's normalizer, pre-tokenizer, decoder and special tokens, so the
vocabulary strings live in the same byte-level space; a token whose string the old vocabulary also
has keeps its old embedding row, and every other row is initialised from the old rows of its pieces.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass

from xlt.config import XltError
from xlt.tokenizer.merges import BYTE_LEVEL, detect_family, unreachable_tokens


@dataclass
class Swap:
    tokenizer_json: dict
    shared: dict[int, int]  # new id -> old id, for strings both vocabularies hold
    unreachable: int

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_str(json.dumps(self.tokenizer_json))


def _remap_post_processor(node, ids: dict[str, int]):
    """TemplateProcessing stores special-token ids: point them at the new ids."""
    if isinstance(node, dict):
        if "tokens" in node and "ids" in node and isinstance(node["tokens"], list):
            node["ids"] = [ids[t] for t in node["tokens"]]
        for v in node.values():
            _remap_post_processor(v, ids)
    elif isinstance(node, list):
        for v in node:
            _remap_post_processor(v, ids)


def train_swap_tokenizer(base_tj: dict, texts: list[str], vocab_size: int, min_frequency: int = 2,
                         max_token_chars: int = 16, nfkc: bool = False) -> Swap:
    import unicodedata

    from tokenizers import Tokenizer, pre_tokenizers, trainers


    if detect_family(base_tj) != BYTE_LEVEL:
        raise XltError("tokenizer_mode=swap: supported for byte-level BPE tokenizers only")
    specials = sorted(base_tj.get("added_tokens") or [], key=lambda t: t["id"])
    if vocab_size <= len(specials) + 256:
        raise XltError(f"new_tokens={vocab_size}: a swapped vocabulary needs more than {len(specials) + 256} tokens")
    if nfkc:
        texts = [unicodedata.normalize("NFKC", t) for t in texts]
    # Start from the base tokenizer itself so normalizer / pre-tokenizer / decoder are identical.
    skeleton = copy.deepcopy(base_tj)
    skeleton["added_tokens"] = []
    skeleton["post_processor"] = None
    skeleton["model"]["vocab"], skeleton["model"]["merges"] = {}, []
    tok = Tokenizer.from_str(json.dumps(skeleton))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=max(1, min_frequency), show_progress=False,
                                  special_tokens=[t["content"] for t in specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  max_token_length=3 * max_token_chars)
    tok.train_from_iterator(texts, trainer=trainer)
    tj = json.loads(tok.to_str())
    # Keep the base's flags of each special token (special, normalized, lstrip, ...), with new ids.
    new_ids = {**tj["model"]["vocab"], **{t["content"]: t["id"] for t in tj.get("added_tokens") or []}}
    tj["added_tokens"] = [dict(t, id=new_ids[t["content"]]) for t in specials]
    for key in ("post_processor", "decoder", "normalizer", "pre_tokenizer"):
        tj[key] = copy.deepcopy(base_tj.get(key))
    _remap_post_processor(tj["post_processor"], new_ids)
    old_ids = {**base_tj["model"]["vocab"], **{t["content"]: t["id"] for t in specials}}
    shared = {i: old_ids[s] for s, i in new_ids.items() if s in old_ids}
    new_tok = Tokenizer.from_str(json.dumps(tj))
    special_ids = {t["id"] for t in tj["added_tokens"]}
    bad = unreachable_tokens(new_tok, BYTE_LEVEL, [i for i in set(new_ids.values()) if i not in special_ids])
    return Swap(tokenizer_json=tj, shared=shared, unreachable=len(bad))


def fix_tokenizer_config(output_dir: str, new_tj: dict) -> None:
    """tokenizer_config.json may list added tokens by id: rewrite those ids for the new vocabulary."""
    path = os.path.join(output_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    dec = cfg.get("added_tokens_decoder")
    if isinstance(dec, dict):
        ids = {t["content"]: t["id"] for t in new_tj.get("added_tokens") or []}
        cfg["added_tokens_decoder"] = {str(ids[v["content"]]): v for v in dec.values() if v.get("content") in ids}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, ensure_ascii=False, indent=2)
