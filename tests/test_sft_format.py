"""SFT formats: rendered text, loss mask (labels), BOS, truncation, ChatML installation, stop tokens, preview."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from xlt.config import XltError
from xlt.data.sft import STABLELM_SYSTEM
from xlt.data.sft_format import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    build_sft_dataset,
    generation_prompt,
    generation_prompt_ids,
    install_chatml,
    render,
    stop_token_ids,
    tokenize_example,
)

SINGLE = [{"role": "user", "content": "日本の首都はどこですか？"}, {"role": "assistant", "content": "東京です。"}]
MULTI = [
    {"role": "system", "content": "あなたは親切なアシスタントです。"},
    {"role": "user", "content": "日本の首都はどこですか？"},
    {"role": "assistant", "content": "東京です。"},
    {"role": "user", "content": "人口を教えてください。", "input": "2020年の国勢調査"},
    {"role": "assistant", "content": "約1400万人です。\n東京都の人口です。"},
]


def _tiny_bpe(adds_bos: bool = True):
    """A byte-level BPE trained here (no ChatML tokens; Llama-style ``<s>`` BOS added by default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [m["content"] + m.get("input", "") for m in MULTI] * 20 + ["The quick brown fox jumps over it."] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _assistant_texts(messages, marker):
    return [m["content"] + marker for m in messages if m["role"] == "assistant"]


def check_labels(tok, messages, fmt, marker, max_length=None):
    """The loss-mask contract: labels are input ids on the assistant contents + end markers, -100 elsewhere."""
    ex = tokenize_example(messages, fmt, tok, max_length)
    assert len(ex.labels) == len(ex.input_ids)
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(ex.labels, ex.input_ids))  # never shifted
    expected = _assistant_texts(messages, marker)
    # the trained character runs are exactly the assistant turns (+ marker): no prompt / system / user text
    assert [ex.text[s:e] for s, e in ex.trained] == expected
    # and the trained tokens decode to them, in order
    trained_ids = [lab for lab in ex.labels if lab != IGNORE_INDEX]
    assert tok.decode(trained_ids, skip_special_tokens=False) == "".join(expected)
    # every token touching a non-assistant character is -100
    enc = tok(ex.text, add_special_tokens=False, return_offsets_mapping=True)
    shift = len(ex.input_ids) - len(enc["input_ids"])  # a prepended BOS
    for j, (a, b) in enumerate(enc["offset_mapping"]):
        inside = any(s <= a and b <= e for s, e in ex.trained) and b > a
        assert (ex.labels[j + shift] != IGNORE_INDEX) == inside
    return ex


# --- stablelm_alpaca ---------------------------------------------------------------------------
def test_stablelm_text_is_the_jslm_prompt(embedded_tokenizer):
    eos = embedded_tokenizer.eos_token
    msgs = [{"role": "user", "content": "翻訳して", "input": "Hello"}, {"role": "assistant", "content": "こんにちは"}]
    r = render(msgs, "stablelm_alpaca", embedded_tokenizer)
    assert r.text == (STABLELM_SYSTEM + "\n\n### 指示: \n翻訳して\n\n### 入力: \nHello\n\n### 応答: \nこんにちは" + eos)
    assert [r.text[s:e] for s, e in r.trained] == ["こんにちは" + eos]
    # multi-turn continues with further blocks; a system turn replaces the default system text
    r = render(MULTI, "stablelm_alpaca", embedded_tokenizer)
    assert r.text.startswith(MULTI[0]["content"] + "\n\n### 指示: \n") and STABLELM_SYSTEM not in r.text
    assert r.text.count("### 応答: \n") == 2 and "### 入力: \n2020年の国勢調査\n\n### 応答: \n" in r.text
    assert generation_prompt(MULTI[:4], "stablelm_alpaca", embedded_tokenizer) == r.text[:r.trained[1][0]]


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_stablelm_labels(embedded_tokenizer, messages):
    ex = check_labels(embedded_tokenizer, messages, "stablelm_alpaca", embedded_tokenizer.eos_token)
    assert not ex.truncated and embedded_tokenizer.bos_token_id not in ex.input_ids  # SmolLM2 adds no BOS


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_stablelm_labels_with_default_bos(messages):
    tok = _tiny_bpe()
    ex = check_labels(tok, messages, "stablelm_alpaca", "</s>")
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids.count(tok.bos_token_id) == 1
    assert ex.labels[0] == IGNORE_INDEX


def test_japanese_text_mask_on_real_paragraphs(embedded_tokenizer, ja_wiki):
    """Byte-level pieces of Japanese characters never shift the mask: real paragraphs as prompts and answers."""
    paras = [p for p in ja_wiki if 20 < len(p) < 400][:16]
    for q, a in zip(paras[::2], paras[1::2]):
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        check_labels(embedded_tokenizer, msgs, "stablelm_alpaca", embedded_tokenizer.eos_token)
        check_labels(embedded_tokenizer, msgs, "chat", "<|im_end|>")


@pytest.mark.parametrize("fmt,content", [("stablelm_alpaca", "\n\n東京です。"), ("chat", "  東京です。"),
                                         ("chat", "\n\n東京です。")])
def test_token_straddling_the_prompt_boundary_is_not_trained(embedded_tokenizer, fmt, content):
    """A merge across the seam ("応答: \\n" + "\\n..." -> one token) carries prompt text: it stays -100,
    the rest of the answer is trained, and no prompt character is ever trained."""
    tok = embedded_tokenizer
    msgs = [{"role": "user", "content": "日本の首都は？"}, {"role": "assistant", "content": content}]
    r = render(msgs, fmt, tok)
    (start, end), = r.trained
    enc = tok(r.text, add_special_tokens=False, return_offsets_mapping=True)
    straddling = [j for j, (a, b) in enumerate(enc["offset_mapping"]) if a < start < b]
    assert straddling, "the case no longer straddles; pick another"
    ex = tokenize_example(msgs, fmt, tok, None)
    assert all(ex.labels[j] == IGNORE_INDEX for j in straddling)
    (s, e), = ex.trained
    assert start < s <= enc["offset_mapping"][straddling[-1]][1] and e == end
    assert ex.text[s:e] == r.text[s:end] and r.text[s:end].endswith("東京です。" + tok.eos_token)


# --- chat templates ----------------------------------------------------------------------------
@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_chat_labels_own_template(embedded_tokenizer, messages):
    ex = check_labels(embedded_tokenizer, messages, "chat", "<|im_end|>")
    assert ex.text == embedded_tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"] + ("\n\n" + m["input"] if m.get("input") else "")}
         for m in messages], tokenize=False)
    # the default system prompt of the SmolLM2 template (single-turn) is not trained
    assert "You are a helpful AI assistant" not in "".join(ex.text[s:e] for s, e in ex.trained)


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_chat_labels_chatml_installed(messages):
    tok = _tiny_bpe()
    assert install_chatml(tok) == ["<|im_start|>", "<|im_end|>"]
    ex = check_labels(tok, messages, "chat", "<|im_end|>")
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids.count(tok.bos_token_id) == 1
    assert ex.input_ids[1] == tok.convert_tokens_to_ids("<|im_start|>")
    assert stop_token_ids("chat", tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "</s>"


def test_no_double_bos_when_the_template_writes_it():
    tok = _tiny_bpe()
    install_chatml(tok)
    tok.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE
    ex = check_labels(tok, MULTI, "chat", "<|im_end|>")
    assert ex.text.startswith("<s>") and ex.input_ids.count(tok.bos_token_id) == 1 and ex.input_ids[0] == 0


def test_template_not_prefix_stable_is_one_line(embedded_tokenizer):
    tok = copy.deepcopy(embedded_tokenizer)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% if loop.last %}"
                         " (last){% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                         "<|im_start|>assistant\n{% endif %}")
    with pytest.raises(XltError, match="not prefix-stable") as e:
        render(SINGLE, "chat", tok)
    assert "\n" not in str(e.value)


def test_stop_tokens(embedded_tokenizer):
    im_end = embedded_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids("chat", embedded_tokenizer) == [im_end]
    tok = _tiny_bpe()
    assert stop_token_ids("stablelm_alpaca", tok) == [tok.convert_tokens_to_ids("</s>")]


# --- truncation and the dataset ----------------------------------------------------------------
def test_truncation_and_counts(embedded_tokenizer):
    tok = embedded_tokenizer
    full = tokenize_example(MULTI, "stablelm_alpaca", tok, None)
    ex = tokenize_example(MULTI, "stablelm_alpaca", tok, len(full.input_ids) - 3)
    assert ex.truncated and not full.truncated and ex.input_ids == full.input_ids[:-3]
    assert full.text.startswith(ex.text) and len(ex.text) < len(full.text)
    assert all(e <= len(ex.text) for _, e in ex.trained)
    first_answer = render(MULTI, "stablelm_alpaca", tok).trained[0][0]
    n_prompt = len(tok(full.text[:first_answer], add_special_tokens=False)["input_ids"])
    examples = [{"messages": MULTI, "source": "a"}, {"messages": SINGLE, "source": "a"},
                {"messages": MULTI, "source": "b"}]
    rows, counts = build_sft_dataset(examples, "stablelm_alpaca", tok, n_prompt - 2)
    # every example is cut before its first answer: all fully masked, dropped and counted
    assert rows == [] and counts == {"a": {"truncated": 2, "fully_masked": 2}, "b": {"truncated": 1, "fully_masked": 1}}
    rows, counts = build_sft_dataset(examples, "stablelm_alpaca", tok, len(full.input_ids) - 3)
    assert len(rows) == 3 and counts == {"a": {"truncated": 1, "fully_masked": 0}, "b": {"truncated": 1, "fully_masked": 0}}
    assert rows[0] == {"input_ids": ex.input_ids, "labels": ex.labels}


# --- ChatML with a model -------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_install_chatml_resizes_and_initialises(tie):
    from conftest import tiny_llama
    from xlt.data.sft_format import chatml_pieces
    from xlt.train.sft import grow_for_chatml

    tok = _tiny_bpe()
    pieces = {t: [p.id for p in tok.backend_tokenizer.model.tokenize(t)] for t in ("<|im_start|>", "<|im_end|>")}
    model = tiny_llama(len(tok), tie=tie)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    old_pieces = chatml_pieces(tok)
    added = install_chatml(tok)
    grow_for_chatml(model, tok, old_pieces)
    assert added == ["<|im_start|>", "<|im_end|>"] and old_pieces == pieces
    new_in = model.get_input_embeddings().weight.detach()
    new_out = model.get_output_embeddings().weight.detach()
    n = old_in.shape[0]
    assert new_in.shape[0] == n + 2 == len(tok)
    assert torch.equal(new_in[:n], old_in) and torch.equal(new_out[:n], old_out)
    for t in added:
        i = tok.convert_tokens_to_ids(t)
        assert i >= n and len(pieces[t]) > 1
        assert torch.allclose(new_in[i], old_in[pieces[t]].mean(0))
        assert torch.allclose(new_out[i], old_out[pieces[t]].mean(0))
    assert (new_out.data_ptr() == new_in.data_ptr()) == tie
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_install_chatml_keeps_existing_tokens(embedded_tokenizer):
    tok = copy.deepcopy(embedded_tokenizer)
    n = len(tok)
    assert install_chatml(tok) == [] and len(tok) == n
    assert "You are a helpful AI assistant" not in render(SINGLE, "chat", tok).text  # ChatML, no default system


# --- xlt sft preview -----------------------------------------------------------------------------
@pytest.fixture
def preview_recipe(tmp_path, embedded_tokenizer, monkeypatch):
    """A recipe whose model directory holds tokenizer files only; model loading fails the test."""
    import transformers

    import xlt.data.sft
    import xlt.models

    tok_dir = tmp_path / "tok"
    embedded_tokenizer.save_pretrained(tok_dir)

    def boom(*args, **kwargs):
        raise AssertionError("xlt sft preview loaded a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(xlt.models, "load_model", boom)
    long_answer = "とても長い答えです。" * 40
    convs = [{"messages": SINGLE, "source": "x"}, {"messages": MULTI, "source": "x"},
             {"messages": [{"role": "user", "content": "長く"}, {"role": "assistant", "content": long_answer}],
              "source": "y"}]
    data = tmp_path / "convs.jsonl"
    data.write_text("".join(json.dumps({"messages": c["messages"]}, ensure_ascii=False) + "\n" for c in convs),
                    encoding="utf-8")
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"model: {tok_dir}\nsft_datasets:\n  - {{adapter: messages, path: {data}}}\n"
                      f"prompt_format: chat\noutput_dir: {tmp_path / 'run'}\nmax_length: 192\nuse_cpu: true\n"
                      "report_to: none\n", encoding="utf-8")
    return str(recipe)


def test_preview_json(preview_recipe, capsys):
    from xlt.cli import main

    recipe = preview_recipe
    assert main(["sft", "preview", "--config", recipe, "--n", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and all(set(r) == {"text", "trained", "tokens", "truncated"} for r in rows)
    assert [[r["text"][s:e] for s, e in r["trained"]] for r in rows[:2]] == [
        _assistant_texts(SINGLE, "<|im_end|>"), _assistant_texts(MULTI, "<|im_end|>")]
    assert [r["truncated"] for r in rows] == [False, False, True] and rows[2]["tokens"] == 192
    assert all(isinstance(r["tokens"], int) and all(len(sp) == 2 for sp in r["trained"]) for r in rows)


def test_preview_text_highlights(preview_recipe, capsys):
    from xlt.cli import main

    recipe = preview_recipe
    assert main(["sft", "preview", "--config", recipe, "--n", "1", "--prompt_format", "stablelm_alpaca"]) == 0
    out = capsys.readouterr().out
    assert "[[東京です。<|im_end|>]]" in out and "[[" + STABLELM_SYSTEM not in out and "\033[" not in out
    assert out.count("--- example") == 1


@pytest.mark.parametrize("fmt", ["stablelm_alpaca", "chat"])
def test_labels_llama2_sentencepiece_byte_fallback(fmt):
    """Llama-2's SentencePiece BPE: BOS by default, Japanese through <0xNN> byte pieces, Metaspace prefix."""
    from real_tokenizers import real_tokenizer_dir
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_tokenizer_dir("llama2"))
    marker = "</s>"
    if fmt == "chat":
        install_chatml(tok)
        marker = "<|im_end|>"
    ex = check_labels(tok, MULTI, fmt, marker)
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids.count(tok.bos_token_id) == 1
    assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(ex.input_ids))


@pytest.mark.parametrize("fmt", ["stablelm_alpaca", "chat"])
def test_generation_prompt_ids_are_the_training_prefix(embedded_tokenizer, fmt):
    """Generation starts from the very tokens training put before the answer."""
    tok = embedded_tokenizer
    ex = tokenize_example(MULTI, fmt, tok, None)
    second = [j for j, lab in enumerate(ex.labels) if lab != IGNORE_INDEX and ex.labels[j - 1] == IGNORE_INDEX][1]
    assert generation_prompt_ids(MULTI[:4], fmt, tok) == ex.input_ids[:second]
    text = generation_prompt(MULTI[:4], fmt, tok)
    assert tok.decode(ex.input_ids[:second]) == text
    if fmt == "stablelm_alpaca":  # the naive tokenisation of the prompt text ends differently (" \n")
        assert tok(text, add_special_tokens=False)["input_ids"] != ex.input_ids[:second]
