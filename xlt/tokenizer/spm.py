"""Convert a slow SentencePiece-BPE ``tokenizer.model`` into a Llama-2 style ``tokenizer.json``.

xlt works on ``tokenizer.json`` only (the fast tokenizer is what training uses, and what we can
extend exactly). A model directory that ships only the slow ``tokenizer.model`` is refused with a
clear message pointing here; ``python -m xlt.tokenizer.spm DIR`` writes ``DIR/tokenizer.json``.
The layout is the one of Llama-2's own tokenizer.json: normalizer Prepend("▁") + Replace(" ", "▁"),
no pre-tokenizer, a BPE model with byte fallback, and the Replace/ByteFallback/Fuse/Strip decoder.
"""

from __future__ import annotations

import json
import os
import sys

from xlt.config import XltError


def tokenizer_json_from_spm(model_file: str, add_bos: bool = True) -> dict:
    """Build a tokenizer.json dict from a SentencePiece BPE model with byte fallback."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers.convert_slow_tokenizer import generate_merges

    proto = pb.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    mtype = {1: "Unigram", 2: "BPE", 3: "WordLevel", 4: "Char"}.get(proto.trainer_spec.model_type, "?")
    if mtype != "BPE":
        raise XltError(f"tokenizer: unsupported tokenizer model type {mtype} in {model_file} (BPE only)")
    if not proto.trainer_spec.byte_fallback:
        raise XltError(f"tokenizer: {model_file} has no byte fallback; SentencePiece BPE without it is not supported")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    # SentencePiece BPE pieces are ordered by merge priority; derive merges from that order.
    merges = generate_merges(vocab, {p.piece: p.score for p in proto.pieces})
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    special = [{"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, p in enumerate(proto.pieces) if p.type in (2, 3)]
    bos = proto.pieces[proto.trainer_spec.bos_id].piece if proto.trainer_spec.bos_id >= 0 else None
    post = None
    if add_bos and bos:
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}}}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [[a, b] for a, b in merges]},
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isfile(os.path.join(argv[0], "tokenizer.model")):
        print("usage: python -m xlt.tokenizer.spm DIR   (DIR holds tokenizer.model)", file=sys.stderr)
        return 2
    try:
        tj = tokenizer_json_from_spm(os.path.join(argv[0], "tokenizer.model"))
    except XltError as e:
        print(f"xlt: error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(argv[0], "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False)
    print(os.path.join(argv[0], "tokenizer.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
