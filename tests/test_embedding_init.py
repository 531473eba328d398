"""Initialisation of new embedding rows: merge_tree, distill, asymmetric output rows, untying.

Tiny random Llamas (2 layers, hidden 64) around the real SmolLM2 tokenizer, extended by 300 merges
learned on the shared Japanese text.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from tok_fixtures import ja_split, smollm2_dir, tiny_model_dir
from tokenizers import Tokenizer

from xlt.config import TokenizerArguments, XltError
from xlt.tokenizer.embeddings import (
    char_lengths,
    distill_windows,
    expand_ids,
    hidden_mismatch,
    resize_and_init,
    untie,
)
from xlt.tokenizer.extend import build_tokenizer_stage, check_tokenizer_inputs, extend_tokenizer_json, init_new_rows
from xlt.tokenizer.merges import BYTE_LEVEL, merges_as_pairs, read_tokenizer_json

N_NEW = 300
BASE = 49152


@pytest.fixture(scope="module")
def setup():
    """(base tokenizer.json, extension, base Tokenizer, new Tokenizer, pieces, train texts, held-out texts)."""
    train, held = ja_split()
    base_tj = read_tokenizer_json(smollm2_dir())
    ext = extend_tokenizer_json(base_tj, train[:400], N_NEW)
    base, new = Tokenizer.from_str(json.dumps(base_tj)), ext.tokenizer()
    pieces = {i: [t.id for t in base.model.tokenize(new.id_to_token(i))] for i in ext.new_ids}
    return base_tj, ext, base, new, pieces, train[:400], held[:60]


def _model(tmp_path, tied: bool):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir(tmp_path, smollm2_dir(), tied=tied))


def _init(model, setup, **kw) -> dict:
    base_tj, ext, base, new, pieces, train, _ = setup
    args = TokenizerArguments(tokenizer_mode="extend", new_tokens=N_NEW, **kw)
    keep = {i: i for i in range(BASE)}
    return init_new_rows(model, args, BASE + N_NEW, keep, pieces, base, new, ext.tokenizer_json, BYTE_LEVEL, train,
                         skip_merges=len(base_tj["model"]["merges"]))


def _mats(model) -> tuple[torch.Tensor, torch.Tensor]:
    return model.get_input_embeddings().weight.detach().clone(), model.get_output_embeddings().weight.detach().clone()


def test_merge_tree_is_the_nested_mean(tmp_path, setup):
    base_tj, ext, base, new, pieces, _, _ = setup
    model = _model(tmp_path, tied=True)
    old, _ = _mats(model)
    _init(model, setup, embedding_init="merge_tree")
    rows, _ = _mats(model)
    assert torch.equal(rows[:BASE], old)
    ids = new.get_vocab()
    merges = merges_as_pairs(ext.tokenizer_json["model"])[len(base_tj["model"]["merges"]):]
    by_result = {}
    for a, b in merges:
        by_result.setdefault(a + b, (a, b))

    def hand(s: str) -> torch.Tensor:  # the recursive definition, written independently of the code under test
        if ids[s] < BASE:
            return old[ids[s]]
        a, b = by_result[s]
        return (hand(a) + hand(b)) / 2

    def depths(s: str, d: int = 0) -> list[int]:  # depth of each old leaf of the merge tree
        return [d] if ids[s] < BASE else depths(by_result[s][0], d + 1) + depths(by_result[s][1], d + 1)

    two_level = [s for s, (a, b) in by_result.items() if ids[s] >= BASE and (ids[a] >= BASE or ids[b] >= BASE)]
    assert len(two_level) > 20
    for s in two_level[:40]:
        i = ids[s]
        assert torch.allclose(rows[i], hand(s), atol=1e-6)
        assert len(pieces[i]) == len(depths(s)) >= 3
        if len(set(depths(s))) > 1:  # an unbalanced tree: not the flat mean of its pieces
            assert not torch.allclose(rows[i], old[pieces[i]].mean(0), atol=1e-4)
    assert sum(len(set(depths(s))) > 1 for s in two_level[:40]) >= 10
    one_level = [s for s, (a, b) in by_result.items() if ids[s] >= BASE and ids[a] < BASE and ids[b] < BASE]
    i = ids[one_level[0]]  # one merge of two old tokens: the same as the subword mean
    assert torch.allclose(rows[i], old[pieces[i]].mean(0), atol=1e-6)


def test_first_subtoken_output_rows(tmp_path, setup):
    pieces = setup[4]
    model = _model(tmp_path, tied=False)
    old_in, old_out = _mats(model)
    summary = _init(model, setup, output_embedding_init="first_subtoken")
    new_in, new_out = _mats(model)
    assert torch.equal(new_in[:BASE], old_in) and torch.equal(new_out[:BASE], old_out)
    assert summary["output_init"] == "first_subtoken" and not summary["tied"]
    for i, ps in pieces.items():
        assert torch.equal(new_out[i], old_out[ps[0]])
        assert torch.allclose(new_in[i], old_in[ps].mean(0), atol=1e-6)  # input side: subword mean


def test_calibrated_first_subtoken_output_rows(tmp_path, setup):
    """Each new output row is its first piece's row plus c u: c the base model's mean log-probability of the
    token's other pieces after the first (checked by hand on one text), u a direction the head's hidden states
    project to ~1; old rows and the input side as without it; the forward passes are charged."""
    from xlt.tokenizer.embeddings import continuation_stats, count_params

    base, new, pieces = setup[2], setup[3], setup[4]
    text = next(t for t in setup[5] if 60 < len(t) < 120 and sum(len(pieces.get(i, ())) > 1
                                                              for i in new.encode(t).ids) >= 3)
    model = _model(tmp_path, tied=False)
    old_in, old_out = _mats(model)
    ext_ids = new.encode(text, add_special_tokens=False).ids
    old_ids = expand_ids(ext_ids, pieces)
    assert old_ids == base.encode(text, add_special_tokens=False).ids  # the old tokenizer's own segmentation
    with torch.no_grad():
        out = model(input_ids=torch.tensor([old_ids]), output_hidden_states=True)
        h = out.hidden_states[-1][0]
        assert torch.allclose(h @ old_out.T, out.logits[0], atol=1e-4)  # the head reads the last hidden state
        logp = torch.log_softmax(out.logits[0].double(), -1)
    hand: dict[int, list[float]] = {}
    at = 0
    for i in ext_ids:
        k = len(pieces.get(i, [i]))
        if k > 1:
            hand.setdefault(i, []).append(sum(float(logp[at + j - 1, old_ids[at + j]]) for j in range(1, k)))
        at += k
    stats = continuation_stats(model, [text], new, pieces, sorted(pieces))
    assert stats["calibration_tokens"] == len(old_ids) and stats["calibration_occurrences"] == sum(map(len, hand.values()))
    for i, v in hand.items():
        assert stats["logprob"][i] == pytest.approx(sum(v) / len(v), abs=1e-6)
    assert stats["init_flops"] == 2 * count_params(model) * len(old_ids)

    # The init calibrated on this one text: every expected value by hand. c: the mean above for a seen id; for an
    # unseen one, the mean over seen ids with as many pieces (else over all seen ids). u: the ridge least-squares
    # fit of h . u = 1 over the text's last hidden states (ridge CALIBRATION_RIDGE, the documented setting).
    from xlt.tokenizer.embeddings import CALIBRATION_RIDGE

    seen = {i: sum(v) / len(v) for i, v in hand.items()}
    by_len: dict[int, list[float]] = {}
    for i, v in seen.items():
        by_len.setdefault(len(pieces[i]), []).append(v)
    c = {i: seen.get(i, sum(by_len.get(len(ps), seen.values())) / len(by_len.get(len(ps), seen)))
         for i, ps in pieces.items() if len(ps) > 1}
    hd = h.double()
    u = torch.linalg.solve(hd.T @ hd + CALIBRATION_RIDGE * torch.eye(hd.shape[1], dtype=torch.float64),
                           hd.sum(0)).float()
    model = _model(tmp_path, tied=False)
    n_base = count_params(model)  # the base model runs the calibration, before the resize
    one_text = (*setup[:5], [text], setup[6])
    summary = _init(model, one_text, output_embedding_init="calibrated_first_subtoken")
    new_in, new_out = _mats(model)
    assert torch.equal(new_in[:BASE], old_in) and torch.equal(new_out[:BASE], old_out)
    assert summary["output_init"] == "calibrated_first_subtoken"
    assert summary["init_flops"] == 2 * n_base * len(old_ids)  # one forward over the text
    assert summary["calibration_rows_seen"] == len(seen) and max(c.values()) < 0  # log-probabilities
    for i, ps in pieces.items():
        assert torch.allclose(new_in[i], old_in[ps].mean(0), atol=1e-6)  # input side: subword mean
        assert torch.allclose(new_out[i], old_out[ps[0]] + (c[i] * u if len(ps) > 1 else 0), atol=1e-5), i
    # u is fitted so the head's hidden states project to ~1 (SmolLM2: 0.99 +- 0.04 on held-out Japanese, see
    # bench/embedding_init.py); a random 64-wide model has no such direction, only a fit well away from 0.
    with torch.no_grad():
        proj = model(input_ids=torch.tensor([old_ids]), output_hidden_states=True).hidden_states[-1][0] @ u
    assert float(proj.mean()) > 0.3 and summary["calibration_direction_fit"]["mean"] == pytest.approx(
        float((h.double() @ u.double()).mean()), abs=1e-3)


def test_char_lengths_split_characters():
    to = "東京".encode()  # 3 + 3 bytes
    assert char_lengths([to[:2], to[2:]]) == pytest.approx([2 / 3, 4 / 3])
    assert char_lengths([b"ab", "は".encode()]) == pytest.approx([2, 1])
    assert char_lengths([to[1:3], to[3:]]) == pytest.approx([2 / 3, 1])  # an orphan run of 2: a 3-byte character
    assert sum(char_lengths([to[:1], to[1:4], to[4:]])) == pytest.approx(2)


def test_char_weighted_mean_output_rows(tmp_path, setup):
    base, pieces = setup[2], setup[4]
    model = _model(tmp_path, tied=False)
    old_in, old_out = _mats(model)
    _init(model, setup, output_embedding_init="char_weighted_mean")
    _, new_out = _mats(model)
    assert torch.equal(new_out[:BASE], old_out)
    from xlt.tokenizer.merges import token_bytes

    checked = 0
    for i, ps in pieces.items():
        parts = [token_bytes(base.id_to_token(p), BYTE_LEVEL) for p in ps]
        try:
            text = b"".join(parts).decode("utf-8")
        except UnicodeDecodeError:
            continue  # hand check on tokens that are whole text
        share = [1 / len(c.encode()) for c in text for _ in c.encode()]  # each byte: its share of a character
        w, at = [], 0
        for b in parts:
            w.append(sum(share[at: at + len(b)]))
            at += len(b)
        w = torch.tensor(w)
        assert torch.allclose(new_out[i], (old_out[ps] * w[:, None]).sum(0) / w.sum(), atol=1e-6)
        if len(set(w.tolist())) > 1:
            assert not torch.allclose(new_out[i], old_out[ps].mean(0), atol=1e-5)
            checked += 1
    assert checked >= 5


def test_untie_keeps_logits_bit_identical(tmp_path):
    model = _model(tmp_path, tied=True)
    x = torch.tensor([[1, 5, 900, 20000, 49151]])
    with torch.no_grad():
        before = model(x).logits
    assert untie(model) and not untie(model)
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert model.config.tie_word_embeddings is False
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)


def test_untie_stage_save_reload(tmp_path, setup):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir(tmp_path, smollm2_dir(), tied=True)
    old, _ = _mats(AutoModelForCausalLM.from_pretrained(src))
    out = str(tmp_path / "out")
    args = TokenizerArguments(tokenizer_mode="extend", new_tokens=N_NEW, untie_embeddings=True,
                              output_embedding_init="first_subtoken", pad_vocab_multiple=1)
    rep = build_tokenizer_stage(src, args, setup[5], {}, out)
    assert rep["embeddings"]["untied"] and rep["embeddings"]["output_init"] == "first_subtoken"
    assert rep["init_flops"] == 0  # no model run to initialise: nothing to charge
    assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is False
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(f.keys())
    m = AutoModelForCausalLM.from_pretrained(out)
    new_in, new_out = _mats(m)
    assert m.get_output_embeddings().weight.data_ptr() != m.get_input_embeddings().weight.data_ptr()
    assert torch.equal(new_in[:BASE], old) and torch.equal(new_out[:BASE], old)
    ext = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    base = Tokenizer.from_file(os.path.join(src, "tokenizer.json"))
    for i in range(BASE, BASE + N_NEW, 37):
        ps = [t.id for t in base.model.tokenize(ext.id_to_token(i))]
        assert torch.equal(new_out[i], old[ps[0]]) and torch.allclose(new_in[i], old[ps].mean(0), atol=1e-6)
    assert not torch.equal(new_in[BASE:BASE + N_NEW], new_out[BASE:BASE + N_NEW])


def test_asymmetric_output_on_tied_model_refused(tmp_path, setup, no_model_loading):
    src = tiny_model_dir(tmp_path, smollm2_dir(), tied=True)
    args = TokenizerArguments(tokenizer_mode="extend", new_tokens=N_NEW, output_embedding_init="char_weighted_mean")
    with pytest.raises(XltError, match="output_embedding_init=char_weighted_mean.*untie_embeddings") as e:
        check_tokenizer_inputs(src, args)
    assert "\n" not in str(e.value)
    check_tokenizer_inputs(src, TokenizerArguments(tokenizer_mode="extend", new_tokens=N_NEW, untie_embeddings=True,
                                                   output_embedding_init="char_weighted_mean"))
    untied = tiny_model_dir(tmp_path, smollm2_dir(), tied=False)
    check_tokenizer_inputs(untied, args)


def test_asymmetric_output_on_tied_model_refused_at_resize(tmp_path, setup):
    model = _model(tmp_path, tied=True)
    old, _ = _mats(model)
    with pytest.raises(XltError, match="untie_embeddings"):
        resize_and_init(model, BASE + N_NEW, {i: i for i in range(BASE)}, setup[4], output_method="first_subtoken")
    assert torch.equal(model.get_input_embeddings().weight, old)  # refused before any change


@pytest.mark.parametrize("kw, msg", [
    ({"embedding_init": "zeros"}, "embedding_init='zeros': expected one of subword_mean, merge_tree"),
    ({"output_embedding_init": "last"}, "output_embedding_init='last': expected one of same, first_subtoken"),
    ({"distill_steps": 0}, "distill_steps=0: expected an integer >= 1"),
    ({"embedding_init": "distill", "tokenizer_mode": "swap"}, "embedding_init=distill: supported with tokenizer_mode=extend"),
])
def test_bad_init_keys(kw, msg):
    with pytest.raises(XltError, match=msg) as e:
        TokenizerArguments(**kw)
    assert "\n" not in str(e.value)


def test_bad_init_key_in_recipe(tmp_path, no_model_loading):
    from xlt.config import parse_recipe

    p = tmp_path / "r.yaml"
    p.write_text("tokenizer_mode: extend\nnew_tokens: 10\noutput_embedding_init: middle\n")
    with pytest.raises(XltError, match="output_embedding_init='middle'"):
        parse_recipe([TokenizerArguments], ["--config", str(p)])


def test_expansion_is_the_base_segmentation(setup):
    """The distillation targets run the base model on ``expand_ids``: it must be the base tokenizer's encoding."""
    base, new, pieces, held = setup[2], setup[3], setup[4], setup[6]
    for t in held[:40]:
        assert expand_ids(new.encode(t, add_special_tokens=False).ids, pieces) == base.encode(t, add_special_tokens=False).ids


def test_distill_reduces_mismatch_and_keeps_old_rows(tmp_path, setup):
    new, pieces, held = setup[3], setup[4], setup[6]
    new_ids = sorted(pieces)
    probe = distill_windows(held, new, set(new_ids), 24, seed=1)  # held-out text: not what distillation saw
    assert len(probe) == 24

    ref = _model(tmp_path, tied=False)
    _init(ref, setup)  # subword_mean
    ref_in, ref_out = _mats(ref)
    before = hidden_mismatch(ref, probe, pieces, new_ids)

    runs = []
    for _ in range(2):
        model = _model(tmp_path, tied=False)
        old_in, old_out = _mats(model)
        body = {k: v.clone() for k, v in model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
        passes = {True: [], False: []}  # input ids per body pass, with / without gradients (student / targets)
        hook = model.base_model.register_forward_pre_hook(
            lambda m, a, kw, passes=passes: passes[torch.is_grad_enabled()].append(kw["input_ids"].numel()), with_kwargs=True)
        try:
            summary = _init(model, setup, embedding_init="distill", distill_steps=60)
        finally:
            hook.remove()
        new_in, new_out = _mats(model)
        assert torch.equal(new_in[:BASE], old_in) and torch.equal(new_out, ref_out)  # old rows, untied head
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in body.items())  # body frozen
        runs.append(new_in)
    assert torch.equal(runs[0], runs[1])  # deterministic
    assert not torch.equal(runs[0][BASE:], ref_in[BASE:])
    after = hidden_mismatch(model, probe, pieces, new_ids)
    assert after < 0.9 * before, (before, after)
    assert summary["distill_loss_last"] < summary["distill_loss_first"]
    n = sum(p.numel() for p in model.parameters())
    tok = summary["distill_tokens"]
    # Charged as measured: every token of the 60 student passes (forward + backward), and the target passes'
    # tokens (their padding, which the charge leaves out, only adds to what ran).
    assert len(passes[True]) == 60 and tok["forward_backward"] == sum(passes[True])
    assert 0 < tok["forward"] <= sum(passes[False])
    assert summary["init_flops"] == 2 * n * tok["forward"] + 6 * n * tok["forward_backward"] > 0


def test_merge_tree_in_swap_mode(tmp_path, setup):
    """A swapped tokenizer: each non-shared token is the mean of its merge's two parts (shared rows or earlier ones)."""
    from xlt.tokenizer.swap import train_swap_tokenizer

    base_tj, train = setup[0], setup[5]
    sw = train_swap_tokenizer(base_tj, train[:200], 800)
    model = _model(tmp_path, tied=True)
    old, _ = _mats(model)
    new = sw.tokenizer()
    ids = new.get_vocab(with_added_tokens=True)
    base = Tokenizer.from_str(json.dumps(base_tj))
    pieces = {i: [t.id for t in base.model.tokenize(s)] for s, i in ids.items() if i not in sw.shared}
    args = TokenizerArguments(tokenizer_mode="swap", new_tokens=800, embedding_init="merge_tree")
    init_new_rows(model, args, max(ids.values()) + 1, sw.shared, pieces, base, new, sw.tokenizer_json, BYTE_LEVEL,
                  train, skip_merges=0)
    rows, _ = _mats(model)
    for n, o in sw.shared.items():
        assert torch.equal(rows[n], old[o])
    checked = 0
    for a, b in merges_as_pairs(sw.tokenizer_json["model"]):
        r = ids[a + b]
        if r not in sw.shared and checked < 50:
            assert torch.allclose(rows[r], (rows[ids[a]] + rows[ids[b]]) / 2, atol=1e-6)
            checked += 1
    assert checked == 50
