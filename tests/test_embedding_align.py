"""``embedding_init: align`` (Yamaguchi et al. 2024): each new row is the frequency-weighted mean of the old rows of
the old tokens its occurrences overlap by character offsets on the target text."""

from __future__ import annotations

import json

import pytest
import torch
from tok_fixtures import ja_split, smollm2_dir, tiny_model_dir
from tokenizers import Tokenizer
from tokenizers.models import BPE

from xlt.config import TokenizerArguments
from xlt.tokenizer.embeddings import align_weights, resize_and_init
from xlt.tokenizer.extend import extend_tokenizer_json, init_new_rows
from xlt.tokenizer.merges import BYTE_LEVEL, read_tokenizer_json

OLD_VOCAB = {"a": 0, "b": 1, "c": 2, "d": 3, "x": 4, "ab": 5, "cd": 6}
NEW_VOCAB = {**OLD_VOCAB, "bc": 7, "bcd": 8, "zz": 9}


def _toy() -> tuple[Tokenizer, Tokenizer]:
    """Old: "abcd" -> ab | cd. New (other merges): "abcd" -> a | bcd."""
    old = Tokenizer(BPE(OLD_VOCAB, [("a", "b"), ("c", "d")]))
    new = Tokenizer(BPE(NEW_VOCAB, [("b", "c"), ("bc", "d")]))
    return old, new


def test_overlap_counts_by_hand():
    old, new = _toy()
    assert old.encode("abcd").tokens == ["ab", "cd"] and new.encode("abcd").tokens == ["a", "bcd"]
    # abcd: bcd [1,4) overlaps ab [0,2) and cd [2,4); abcdcd: the same once; xbcd: old x | b | cd, bcd [1,4)
    # overlaps b [1,2) and cd [2,4). "zz" never occurs.
    got = align_weights(["abcd", "abcdcd", "xbcd"], old, new, [7, 8, 9])
    assert got == {8: {5: 2, 6: 3, 1: 1}}


def test_rows_are_the_weighted_means_input_and_untied_output(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=7, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    e_in, e_out = (m.weight.detach().clone() for m in (model.get_input_embeddings(), model.get_output_embeddings()))
    weights = {8: {5: 2, 6: 3, 1: 1}}
    pieces = {7: [1, 2], 8: [1, 6], 9: [4, 4]}
    resize_and_init(model, 10, {i: i for i in range(7)}, pieces, method="align", align=weights)
    new_in, new_out = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    for e, new in ((e_in, new_in), (e_out, new_out)):
        assert torch.equal(new[:7], e)
        assert torch.allclose(new[8], (2 * e[5] + 3 * e[6] + e[1]) / 6, atol=1e-6)
        assert torch.allclose(new[7], (e[1] + e[2]) / 2, atol=1e-6)  # not in the text: subword mean
        assert torch.allclose(new[9], e[4], atol=1e-6)


def _naive_weights(texts, old, new, nid) -> dict[int, int]:
    """Every (new occurrence, old token) pair tested: the quadratic reading of the definition."""
    out: dict[int, int] = {}
    for t in texts:
        o, n = old.encode(t, add_special_tokens=False), new.encode(t, add_special_tokens=False)
        for i, (s, e) in zip(n.ids, n.offsets):
            if i != nid:
                continue
            for j, (os_, oe) in zip(o.ids, o.offsets):
                if os_ < e and oe > s:
                    out[j] = out.get(j, 0) + 1
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_extension_stage_aligns_the_new_rows_of_the_real_tokenizer(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    train, _ = ja_split()
    texts = train[:200]
    base_tj = read_tokenizer_json(smollm2_dir())
    ext = extend_tokenizer_json(base_tj, texts, 64)
    base, new = Tokenizer.from_str(json.dumps(base_tj)), ext.tokenizer()
    n_base = base.get_vocab_size()
    pieces = {i: [t.id for t in base.model.tokenize(new.id_to_token(i))] for i in ext.new_ids}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(tmp_path, smollm2_dir(), tied=tied))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    args = TokenizerArguments(tokenizer_mode="extend", new_tokens=64, embedding_init="align")
    summary = init_new_rows(model, args, n_base + 64, {i: i for i in range(n_base)}, pieces, base, new,
                            ext.tokenizer_json, BYTE_LEVEL, texts, skip_merges=len(base_tj["model"]["merges"]))
    seen = {i for t in texts for i in new.encode(t, add_special_tokens=False).ids} & set(ext.new_ids)
    assert summary["init"] == "align" and summary["aligned_rows"] == len(seen) > 0.9 * len(ext.new_ids)
    rows_in, rows_out = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    for nid in set(ext.new_ids) - seen:  # a merge only ever merged further: the subword mean
        assert torch.allclose(rows_in[nid], old_in[pieces[nid]].mean(0), atol=1e-5)
    for nid in sorted(seen)[:12]:
        w = _naive_weights(texts, base, new, nid)
        ids, c = list(w), torch.tensor([float(v) for v in w.values()])
        for old, rows in ((old_in, rows_in), (old_out, rows_out)):
            assert torch.allclose(rows[nid], (old[ids] * c[:, None]).sum(0) / c.sum(), atol=1e-5)
