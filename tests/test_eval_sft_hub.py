"""Bits per character, instruction data and prompts, the model card (the spike guard: test_skip_step.py)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from conftest import tiny_llama
from xlt.data.sft import check_sft_specs, load_sft_data
from xlt.data.sft_format import render
from xlt.eval.bpc import _windows, bits_per_char


def manual_bits(model, ids: list[int], start: int) -> float:
    seq = torch.tensor([[start] + ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq).logits[0, :-1].float(), -1)
    return -float(logp.gather(-1, seq[0, 1:, None]).sum()) / math.log(2)


def test_bits_per_char_counts_every_token_once(embedded_tokenizer):
    model = tiny_llama(len(embedded_tokenizer)).eval()
    texts = ["日本語の文章です。", "A short English line.", "東京は日本の首都である。" * 3]
    start = embedded_tokenizer.eos_token_id if embedded_tokenizer.bos_token_id is None else embedded_tokenizer.bos_token_id
    expected = sum(manual_bits(model, embedded_tokenizer(t, add_special_tokens=False)["input_ids"], start)
                   for t in texts)
    r = bits_per_char(model, embedded_tokenizer, texts, batch_size=2)
    assert r["chars"] == sum(map(len, texts))
    assert r["bits"] == pytest.approx(expected, rel=1e-4)
    assert r["bits_per_char"] == pytest.approx(expected / r["chars"], rel=1e-4)


def test_long_documents_are_windowed_without_losing_or_repeating_a_token():
    ids = list(range(100, 125))
    wins = _windows(ids, start=1, max_length=8, stride=4)
    predicted = [t for w, n in wins for t in w[len(w) - n:]]
    assert predicted == ids  # each token predicted exactly once (sliding windows: tests/test_eval_bpc.py)
    assert all(len(w) <= 8 for w, _ in wins)


def test_evaluate_bpc_command_prints_the_json_interface(tmp_path, tiny_model_dir, capsys):
    from xlt.cli import main

    data = tmp_path / "ja.jsonl"
    data.write_text("\n".join(json.dumps({"body": t}, ensure_ascii=False) for t in ["今日は晴れ。", "明日は雨。"]),
                    encoding="utf-8")
    assert main(["evaluate", "bpc", "--model", tiny_model_dir, "--data", str(data), "--text-field", "body",
                 "--max-docs", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"bits_per_char", "bits_per_byte", "chars", "tokens"} and out["chars"] == len("今日は晴れ。")
    txt = tmp_path / "en.txt"
    txt.write_text("First document.\n\nSecond one.\n", encoding="utf-8")
    assert main(["evaluate", "bpc", "--model", tiny_model_dir, "--data", str(txt), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["chars"] == len("First document.") + len("Second one.")


def test_stablelm_alpaca_format_is_the_japanese_stablelm_prompt(embedded_tokenizer):
    tok = embedded_tokenizer
    r = render([{"role": "user", "content": "日本の首都は？"}, {"role": "assistant", "content": "東京です。"}],
               "stablelm_alpaca", tok)
    assert r.text == ("以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"
                      "\n\n### 指示: \n日本の首都は？\n\n### 応答: \n東京です。" + tok.eos_token)
    with_input = render([{"role": "user", "content": "質問", "input": "文脈"}, {"role": "assistant", "content": "答"}],
                        "stablelm_alpaca", tok)
    assert "### 指示: \n質問\n\n### 入力: \n文脈\n\n### 応答: \n答" in with_input.text


def test_instruction_adapters(tmp_path):
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"instruction": "要約して", "input": "長い文", "output": "短い文"},
        {"instruction": "空", "input": "", "output": ""}]), encoding="utf-8")
    hh = tmp_path / "hh.jsonl"
    hh.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"instruction": "こんにちは", "output": "どうも", "ng_translation": "0"},
        {"instruction": "壊れた", "output": "翻訳", "ng_translation": "1"}]), encoding="utf-8")
    data = load_sft_data([{"adapter": "alpaca", "path": str(alpaca)}, {"adapter": "hh_rlhf", "path": str(hh)},
                          {"adapter": "chatterbot", "embedded": "chatterbot-ja", "max_examples": 3}])
    assert len(data.train) == 1 + 1 + 3  # empty outputs and failed translations are dropped, and counted
    assert data.counts["a.jsonl"]["empty"] == 1 and data.counts["hh.jsonl"]["failed_translation"] == 1
    assert data.train[0]["messages"] == [{"role": "user", "content": "要約して", "input": "長い文"},
                                         {"role": "assistant", "content": "短い文"}]
    with pytest.raises(Exception, match=r"sft_datasets\[0\]: adapter must be one of"):
        check_sft_specs([{"adapter": "vicuna", "path": str(alpaca)}])
    with pytest.raises(Exception, match="has no field 'output'"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"instruction": "x", "answer": "y"}))
        check_sft_specs([{"adapter": "alpaca", "path": str(bad)}])


def test_model_card_dry_run(tmp_path, tiny_model_dir):
    import shutil

    from xlt.hub import push

    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "sft")
    (run / "report.json").write_text(json.dumps({
        "cpt": {"model": "smollm2-135m", "steps": 48, "tokens_per_step": 1024, "train_loss": 3.2},
        "tokens_trained": {"ja": 30000, "en": 19152}, "bpc": {"ja": {"base": 6.5, "cpt": 4.1}},
        "generation": {"prompt": "日本の首都は？", "output": "東京です。"}}), encoding="utf-8")
    card = push(str(run / "sft"), "me/test-ja", dry_run=True)
    text = open(card, encoding="utf-8").read()
    assert "smollm2-135m" in text and "49,152" in text and "6.5000" in text and "東京です。" in text
    assert not any(n.endswith(".bin") for n in os.listdir(run / "sft"))
    assert "README.md" not in os.listdir(run / "sft")  # the dry run stages elsewhere, never in the model folder


def _kept_tokenizer_report() -> dict:
    """report.json of a run that kept its tokenizer, as CPT, SFT and the evaluate stage leave it."""
    return {"cpt": {"model": "smollm2-135m", "steps": 48, "tokens_per_step": 1024, "train_loss": 3.2},
            "tokenizer": {"mode": "none", "new_tokens": 0}, "sft": {"examples": 10, "epochs": 1},
            "bpc": {"ja": {"base": 6.5, "cpt": 4.1, "sft": 4.2}},
            "eval": {"detail": {"base/ja": {"chars": 1000, "tokens": 1250, "chars_per_token": 0.8},
                                "cpt/ja": {"chars": 1000, "tokens": 1250, "chars_per_token": 0.8},
                                "sft/ja": {"chars": 1000, "tokens": 1250, "chars_per_token": 0.8}}},
            "speed": {"base": {"chars_per_second": 10.25, "chars_per_token": 0.5, "tokens_per_second": 20.5,
                               "device": "CPU, 2 threads"},
                      "sft": {"chars_per_second": 12.0, "chars_per_token": 0.5, "tokens_per_second": 24.0,
                              "device": "CPU, 2 threads"}}}


def test_model_card_of_a_kept_tokenizer_states_figures_and_no_na_rows():
    from xlt.hub import model_card

    # xlt_run.json records every CPT setting, embedding_init too, although a kept tokenizer initialises nothing.
    run = {"cpt": {"tokenizer_mode": "none", "embedding_init": "subword_mean", "learning_rate": 1e-4}}
    card = model_card("me/test-ja", _kept_tokenizer_report(), run, {})
    assert "n/a" not in card and "embedding init" not in card and "Vocabulary size: base" not in card
    assert "- The base model's tokenizer, kept unchanged (`tokenizer_mode: none`)" in card
    assert "- Japanese characters per token: 0.800 (1,000 characters of the run's held-out Japanese text in " \
           "1,250 tokens" in card
    assert ("Generation speed (sft model, greedy, one prompt at a time, CPU, 2 threads): 24.0 tokens/s, "
            "12.0 Japanese characters/s; the base model: 20.5 tokens/s, 10.2 Japanese characters/s.") in card
    assert "see REPORT.md" not in card.split("Generation speed")[1].splitlines()[0]
    # A bare report: what was not measured is left out, not printed as n/a.
    bare = model_card("me/test-ja", {"bpc": {"ja": {"base": 6.5}}})
    assert "n/a" not in bare and "Generation speed" not in bare and "- Continued pretraining" not in bare


def test_model_card_of_an_extended_tokenizer_states_the_change():
    from xlt.hub import model_card

    report = _kept_tokenizer_report()
    report["tokenizer"] = {"mode": "extend", "new_tokens": 1024, "ja_chars_per_token": {"base": 0.56, "extended": 1.21}}
    report["eval"]["detail"]["sft/ja"] = {"chars": 1000, "tokens": 800, "chars_per_token": 1.25}
    tokr = {"mode": "extend", "init": "subword_mean", "vocab_size": {"base": 49152, "extended": 50176}}
    card = model_card("me/test-ja", report, {"cpt": {"tokenizer_mode": "extend"}}, tokr)
    assert "- Mode: extend; new tokens: 1,024; embedding init: subword_mean" in card
    assert "- Vocabulary size: base 49152 -> extended 50176" in card
    assert "ja characters per token on the tokenizer stage's sample: base 0.56 -> extended 1.21" in card
    assert "Japanese characters per token: 1.250 (1,000 characters" in card
    assert "; the base model's tokenizer: 0.800" in card and "n/a" not in card


def test_pushed_card_measures_japanese_chars_per_token_when_the_run_was_not_evaluated(tmp_path, tiny_model_dir,
                                                                                       embedded_tokenizer):
    import shutil

    from xlt.hub import push

    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "sft")
    (run / "heldout").mkdir()
    docs = ["梅雨は東アジアの気象現象です。", "今日は晴れ。"]
    (run / "heldout" / "ja.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n"
                                                      for d in docs), encoding="utf-8")
    (run / "report.json").write_text(json.dumps({"tokenizer": {"mode": "none", "new_tokens": 0}}), encoding="utf-8")
    text = open(push(str(run / "sft"), "me/test-ja", dry_run=True), encoding="utf-8").read()
    chars = sum(map(len, docs))
    tokens = sum(len(embedded_tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs)
    assert f"- Japanese characters per token: {chars / tokens:.3f} ({chars:,} characters" in text
    assert f"kept unchanged (`tokenizer_mode: none`): {len(embedded_tokenizer):,} tokens" in text
    assert "n/a" not in text
