"""Bits per character / byte with a sliding window: hand computation, context, per-file CLI results."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_llama
from xlt.eval.bpc import _windows, bits_per_char


class CopyModel(torch.nn.Module):
    """A real causal LM whose logits we control: p(next = v) ∝ 1 + alpha · (times v occurs in the visible context).

    It predicts better the more context it sees on repetitive text, so it tells context lengths apart.
    """

    def __init__(self, vocab_size: int, alpha: float = 20.0):
        super().__init__()
        self.vocab_size, self.alpha = vocab_size, alpha
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a device for next(model.parameters())

    def forward(self, input_ids, attention_mask=None, **_):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        counts = torch.zeros(*input_ids.shape, self.vocab_size, device=input_ids.device)
        counts.scatter_(-1, input_ids.unsqueeze(-1), mask.unsqueeze(-1).float())
        return SimpleNamespace(logits=torch.log1p(self.alpha * counts.cumsum(dim=1)) + self.anchor)


def start_token(tok) -> int:
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def hand_bits(model, seq: list[int], context_start) -> float:
    """-log2 p of every token seq[1:], one plain forward pass per token over seq[context_start(i):i]."""
    total = 0.0
    with torch.no_grad():
        for i in range(1, len(seq)):
            ctx = torch.tensor([seq[context_start(i):i]])
            logp = torch.log_softmax(model(input_ids=ctx).logits[0, -1].float(), -1)
            total -= float(logp[seq[i]]) / math.log(2)
    return total


def sliding_start(max_length: int, stride: int, n: int):
    """The first context position of token i under the documented rule (independent of _windows)."""
    def start(i: int) -> int:
        if i < max_length:
            return 0
        end = max_length
        while end <= i:
            end = min(n, end + stride)
        return end - max_length
    return start


def repetitive_doc(n_words: int = 120, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(["猫が", "犬と", "鳥の", "魚を", "馬に"]) for _ in range(n_words)) + "。"


def test_bpc_equals_a_token_by_token_hand_computation(embedded_tokenizer):
    tok = embedded_tokenizer
    model = tiny_llama(len(tok), seed=3).eval()
    texts = ["東京は日本の首都である。" * 4, "A short English line."]
    start = start_token(tok)
    expected = 0.0
    for t in texts:
        seq = [start] + tok(t, add_special_tokens=False)["input_ids"]
        expected += hand_bits(model, seq, sliding_start(16, 5, len(seq)))
    assert len(tok(texts[0], add_special_tokens=False)["input_ids"]) > 30  # several windows
    r = bits_per_char(model, tok, texts, max_length=16, stride=5, batch_size=3)
    assert r["bits"] == pytest.approx(expected, rel=1e-4)
    assert r["bits_per_char"] == pytest.approx(expected / sum(map(len, texts)), rel=1e-4)
    assert r["bits_per_byte"] == pytest.approx(expected / sum(len(t.encode("utf-8")) for t in texts), rel=1e-4)
    assert r["bytes"] == sum(len(t.encode("utf-8")) for t in texts) > r["chars"]


def test_windows_score_every_token_once_with_at_least_window_minus_stride_context():
    ids = list(range(100, 141))
    for max_length, stride in ((8, 3), (8, 7), (8, 4), (50, 25)):
        wins = _windows(ids, start=1, max_length=max_length, stride=stride)
        scored = [t for w, n in wins for t in w[len(w) - n:]]
        assert scored == ids
        assert all(len(w) <= max_length for w, _ in wins)
        assert wins[0][1] == len(wins[0][0]) - 1  # the first window scores all its tokens
        assert all(len(w) - n >= max_length - stride for w, n in wins[1:])
        assert all(n <= stride for _, n in wins[1:])


def test_sliding_window_equals_full_context_when_the_document_fits(embedded_tokenizer):
    model = tiny_llama(len(embedded_tokenizer), seed=1).eval()
    texts = ["日本語の文章です。今日は晴れ。", "富士山は高い山です。"]
    full = bits_per_char(model, embedded_tokenizer, texts, max_length=512)
    for stride in (1, 7, 63):
        assert bits_per_char(model, embedded_tokenizer, texts, max_length=64, stride=stride)["bits"] == \
            pytest.approx(full["bits"], rel=1e-5)


def test_sliding_window_on_a_long_document_is_closer_to_full_context_than_disjoint(embedded_tokenizer):
    tok = embedded_tokenizer
    doc = [repetitive_doc()]
    n = len(tok(doc[0], add_special_tokens=False)["input_ids"])
    assert n > 200
    model = CopyModel(len(tok))
    full = bits_per_char(model, tok, doc, max_length=n + 1)["bits"]
    sliding = bits_per_char(model, tok, doc, max_length=32, stride=8)["bits"]
    disjoint = bits_per_char(model, tok, doc, max_length=32, stride=31)["bits"]  # the old reading
    assert full < sliding < disjoint  # more context, fewer bits: sliding is the closer to full context
    # A real (random) transformer also scores the two readings differently.
    llama = tiny_llama(len(tok), seed=2).eval()
    a = bits_per_char(llama, tok, doc, max_length=32, stride=8)["bits"]
    b = bits_per_char(llama, tok, doc, max_length=32, stride=31)["bits"]
    assert a != pytest.approx(b, rel=1e-6)


def test_bad_stride_is_rejected(embedded_tokenizer):
    model = tiny_llama(len(embedded_tokenizer)).eval()
    for stride in (0, 16, 40):
        with pytest.raises(ValueError, match="stride"):
            bits_per_char(model, embedded_tokenizer, ["abc"], max_length=16, stride=stride)


def test_evaluate_bpc_cli_one_file_and_several(tmp_path, tiny_model_dir, capsys):
    from xlt.cli import main

    ja = tmp_path / "ja.jsonl"
    ja.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in ["今日は晴れ。", "明日は雨。"]),
                  encoding="utf-8")
    en = tmp_path / "en.txt"
    en.write_text("First document.\n\nSecond one, a little longer.\n", encoding="utf-8")
    assert main(["evaluate", "bpc", "--model", tiny_model_dir, "--data", str(ja), "--json"]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(one) == {"bits_per_char", "bits_per_byte", "chars", "tokens"}
    chars = len("今日は晴れ。明日は雨。")
    assert one["chars"] == chars
    assert one["bits_per_byte"] == pytest.approx(one["bits_per_char"] * chars / len("今日は晴れ。明日は雨。".encode()))
    assert main(["evaluate", "bpc", "--model", tiny_model_dir, "--data", str(ja), str(en), "--stride", "3",
                 "--max-length", "8", "--batch-size", "2", "--json"]) == 0
    many = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(many["files"]) == {str(ja), str(en)}
    f_ja, f_en = many["files"][str(ja)], many["files"][str(en)]
    assert set(f_en) == set(one) and f_en["chars"] == len("First document.") + len("Second one, a little longer.")
    assert many["chars"] == f_ja["chars"] + f_en["chars"] and many["tokens"] == f_ja["tokens"] + f_en["tokens"]
    total_bits = f_ja["bits_per_char"] * f_ja["chars"] + f_en["bits_per_char"] * f_en["chars"]
    assert many["bits_per_char"] == pytest.approx(total_bits / many["chars"])


def test_evaluate_bpc_cli_bad_stride_is_one_line(tmp_path, capsys):
    from xlt.cli import main

    data = tmp_path / "a.txt"
    data.write_text("text\n", encoding="utf-8")
    assert main(["evaluate", "bpc", "--model", "nope-not-a-model", "--data", str(data), "--max-length", "8",
                 "--stride", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--stride" in err[0]
