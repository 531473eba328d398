"""Right after extension (no training), on the real SmolLM2: bits per character by init method."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tok_fixtures import en_text, ja_split

N_NEW = 4000


@pytest.mark.slow
def test_init_methods_bits_per_char():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from xlt.eval.bpc import bits_per_char
    from xlt.models import load_model, load_tokenizer
    from xlt.tokenizer.embeddings import padded_size, resize_and_init
    from xlt.tokenizer.extend import extend_tokenizer_json
    from xlt.tokenizer.merges import read_tokenizer_json

    torch.manual_seed(0)
    train, held = ja_split()
    ja, en = held[:12], [en_text()[-3000:]]
    base_tok = load_tokenizer("smollm2-135m")
    base_tj = read_tokenizer_json("smollm2-135m")
    ext = extend_tokenizer_json(base_tj, train, N_NEW)
    new_tok = PreTrainedTokenizerFast(tokenizer_object=ext.tokenizer(), bos_token=base_tok.bos_token,
                                      eos_token=base_tok.eos_token, pad_token=base_tok.pad_token)
    # One load; each init method starts from a copy. Only what is asserted is scored: English under the base
    # tokenizer and under subword_mean, Japanese under each method (each bits-per-char pass is a 135M forward
    # over the texts, the cost of this test).
    base_model = load_model("smollm2-135m", torch_dtype="float32")
    res = {"base": (None, bits_per_char(base_model, base_tok, en)["bits_per_char"])}
    base_rows = base_model.get_input_embeddings().weight.shape[0]
    bt, old_bpe = ext.tokenizer(), Tokenizer.from_str(json.dumps(base_tj))
    # Each new token's pieces: the old BPE model run on its vocabulary string.
    pieces = {i: [t.id for t in old_bpe.model.tokenize(bt.id_to_token(i))] for i in ext.new_ids}
    for method in ("subword_mean", "mean", "random"):
        model = copy.deepcopy(base_model)
        resize_and_init(model, padded_size(base_rows + N_NEW, 64), {i: i for i in range(base_rows)}, pieces,
                        method=method)
        en_bpc = bits_per_char(model, new_tok, en)["bits_per_char"] if method == "subword_mean" else None
        res[method] = (bits_per_char(model, new_tok, ja)["bits_per_char"], en_bpc)
        del model
    del base_model
    print("\ninit          ja_bpc   en_bpc")
    for k, (j, e) in res.items():
        print(f"{k:12s} {j if j is not None else float('nan'):7.3f} {e if e is not None else float('nan'):8.4f}")
    base_en = res["base"][1]
    assert abs(res["subword_mean"][1] - base_en) / base_en < 0.01  # English moves by < 1%
    assert res["subword_mean"][0] < res["random"][0]
    assert res["subword_mean"][0] < res["mean"][0]
