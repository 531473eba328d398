"""build_tokenizer_stage on tiny random Llamas (tied and untied) with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tok_fixtures import en_text, ja_split, smollm2_dir, tiny_model_dir
from tokenizers import Tokenizer

from xlt.config import TokenizerArguments, XltError
from xlt.tokenizer.extend import build_tokenizer_stage, check_tokenizer_inputs

N_NEW = 700


def _args(**kw) -> TokenizerArguments:
    base = {"tokenizer_mode": "extend", "new_tokens": N_NEW}
    base.update(kw)
    return TokenizerArguments(**base)


def _weights(d: str) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(d)
    return m.get_input_embeddings().weight.detach().clone(), m.get_output_embeddings().weight.detach().clone()


@pytest.fixture(scope="module")
def data():
    train, held = ja_split()
    return train[:400], {"ja": held[:40], "en": [en_text()[:4000]]}


@pytest.mark.parametrize("tied", [True, False])
def test_stage_save_reload(tmp_path, data, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model_dir(tmp_path, smollm2_dir(), tied=tied)
    old_in, old_out = _weights(src)
    out = str(tmp_path / "out")
    rep = build_tokenizer_stage(src, _args(), data[0], data[1], out)
    assert rep["new_tokens"] == N_NEW and rep["unreachable"] == 0 and rep["mode"] == "extend"
    assert rep["vocab_size"] == {"base": 49152, "extended": 49152 + N_NEW}
    assert rep["chars_per_token"]["ja"]["extended"] > rep["chars_per_token"]["ja"]["base"]
    assert rep["chars_per_token"]["en"]["extended"] == rep["chars_per_token"]["en"]["base"]
    assert json.load(open(os.path.join(out, "tokenizer_report.json"), encoding="utf-8"))["new_tokens"] == N_NEW
    assert os.path.isfile(os.path.join(out, "model.safetensors"))

    model = AutoModelForCausalLM.from_pretrained(out)
    new_in, new_out = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    rows = new_in.shape[0]
    assert rows % 64 == 0 and rows >= 49152 + N_NEW and model.config.vocab_size == rows
    assert (new_in.data_ptr() == new_out.data_ptr()) == tied
    # Old rows bit for bit, on both sides (never re-randomised: transformers #35141).
    assert torch.equal(new_in[:49152], old_in) and torch.equal(new_out[:49152], old_out)
    # subword_mean: each new row is the mean of the old rows of its pieces, input and output.
    base = Tokenizer.from_file(os.path.join(src, "tokenizer.json"))
    ext = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    for i in range(49152, 49152 + N_NEW, 97):
        pieces = [t.id for t in base.model.tokenize(ext.id_to_token(i))]
        assert len(pieces) >= 2
        assert torch.allclose(new_in[i], old_in[pieces].mean(0), atol=1e-6)
        assert torch.allclose(new_out[i], old_out[pieces].mean(0), atol=1e-6)
    # Padding rows: the old mean (a real value, not left random or zero).
    assert torch.allclose(new_in[-1], old_in.mean(0), atol=1e-6)
    assert torch.allclose(new_out[-1], old_out.mean(0), atol=1e-6)
    # The HF tokenizer loads and agrees with tokenizer.json.
    hf = AutoTokenizer.from_pretrained(out)
    text = data[1]["ja"][0]
    assert hf(text, add_special_tokens=False)["input_ids"] == ext.encode(text, add_special_tokens=False).ids
    assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == text
    with torch.no_grad():  # the model runs on the new ids
        logits = model(torch.tensor([ext.encode(text).ids[:64]])).logits
    assert logits.shape[-1] == rows and torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["mean", "random"])
def test_other_inits(tmp_path, data, method):
    src = tiny_model_dir(tmp_path, smollm2_dir(), tied=False)
    old_in, old_out = _weights(src)
    out = str(tmp_path / "out")
    build_tokenizer_stage(src, _args(embedding_init=method, new_tokens=300, pad_vocab_multiple=1), data[0], {}, out)
    new_in, new_out = _weights(out)
    assert new_in.shape[0] == 49152 + 300
    assert torch.equal(new_in[:49152], old_in) and torch.equal(new_out[:49152], old_out)
    added = new_in[49152:]
    if method == "mean":
        assert torch.allclose(added, old_in.mean(0).expand_as(added), atol=1e-6)
    else:
        assert abs(float(added.std()) - float(old_in.std())) < 0.1 * float(old_in.std())
        assert not torch.allclose(added[0], added[1])


def test_bad_inputs(tmp_path, data):
    src = tiny_model_dir(tmp_path, smollm2_dir(), tied=True)
    for kw, msg in [({"new_tokens": 0}, "must be > 0"), ({"new_tokens": -5}, "must be > 0"),
                    ({"embedding_init": "zeros"}, "embedding_init"), ({"tokenizer_mode": "grow"}, "tokenizer_mode")]:
        with pytest.raises(XltError, match=msg):
            check_tokenizer_inputs(src, _args(**kw))
    with pytest.raises(XltError, match="Japanese"):
        build_tokenizer_stage(src, _args(), [en_text()[:20000]], {}, str(tmp_path / "o1"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(XltError, match="another model"):
        build_tokenizer_stage(src, _args(), data[0], {}, str(other))
    assert not (other / "tokenizer.json").exists()


def test_unsupported_tokenizers(tmp_path):
    from tokenizers import Tokenizer as T
    from tokenizers import models, pre_tokenizers, trainers

    text = en_text()[:50000].split("\n")
    for name, model, trainer in [("WordPiece", models.WordPiece(unk_token="[UNK]"), trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"])),
                                 ("Unigram", models.Unigram(), trainers.UnigramTrainer(vocab_size=300))]:
        tok = T(model)
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(text, trainer=trainer)
        d = tmp_path / name
        d.mkdir()
        tok.save(str(d / "tokenizer.json"))
        with pytest.raises(XltError, match=f"unsupported tokenizer model type {name}"):
            check_tokenizer_inputs(str(d), _args())
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "tokenizer.model").write_bytes(b"\x00")
    (slow / "tokenizer_config.json").write_text("{}")
    with pytest.raises(XltError, match="no tokenizer.json.*tokenizer.model"):
        check_tokenizer_inputs(str(slow), _args())
