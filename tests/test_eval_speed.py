"""xlt evaluate speed: characters per second and per token, same character budget, on tiny models.

Random models write arbitrary tokens, so both tiny models (the embedded SmolLM2 tokenizer, and its
child extended by the tokenizer stage) first memorise the same Japanese paragraph; greedy decoding
then writes that paragraph, and characters per token reflects the tokenizer, as on a trained model.
"""

from __future__ import annotations

import json

import pytest
import torch
from tok_fixtures import ja_split

from xlt.cli import main
from xlt.config import TokenizerArguments, XltError
from xlt.eval.speed import DEFAULT_PROMPTS, generation_speed, speed_json
from xlt.tokenizer.extend import build_tokenizer_stage

PROMPT_CHARS = 8
MAX_CHARS = 30


@pytest.fixture(scope="module")
def paragraph() -> str:
    _, held = ja_split()
    text = next(t for t in held if len(t) >= 56)
    return text[:56]


def _memorise(model_dir: str, text: str, out_dir: str) -> str:
    """Overfit the model at ``model_dir`` on ``text`` (+ EOS) and save it with its tokenizer to ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(0)
    ids = torch.tensor([tok(text, add_special_tokens=True)["input_ids"] + [tok.eos_token_id]])
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(200):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < 0.1:  # greedy decoding reproduces the text well before the loss reaches 0
            break
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir, paragraph) -> dict[str, str]:
    root = tmp_path_factory.mktemp("speed")
    train, held = ja_split()
    build_tokenizer_stage(tiny_model_dir, TokenizerArguments(tokenizer_mode="extend", new_tokens=700), train[:400],
                          {"ja": held[:40]}, str(root / "ext"))
    return {"base": _memorise(tiny_model_dir, paragraph, str(root / "base-mem")),
            "ext": _memorise(str(root / "ext"), paragraph, str(root / "ext-mem"))}


def _speed(model_dir: str, prompts, max_chars=MAX_CHARS) -> tuple[dict, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return generation_speed(AutoModelForCausalLM.from_pretrained(model_dir), tok, prompts, max_chars), tok


def test_extended_tokenizer_more_chars_per_token_same_budget(models, paragraph):
    prompt = paragraph[:PROMPT_CHARS]
    want = paragraph[PROMPT_CHARS:]
    results = {}
    for name, d in models.items():
        r, tok = _speed(d, [prompt])
        (run,) = r["per_prompt"]
        # the memorised paragraph comes back, so the text (not the tokenizer) is the same for both models
        assert want.startswith(run["text"]), (name, run["text"])
        # the same character budget: stopped at the first token that reached MAX_CHARS, not before or after
        assert run["stop"] == "max_chars" and run["chars"] >= MAX_CHARS
        assert len(run["token_ids"]) == run["tokens"]
        assert len(tok.decode(run["token_ids"][:-1], skip_special_tokens=True).rstrip("\ufffd")) < MAX_CHARS
        assert r["chars"] == run["chars"] and r["tokens"] == run["tokens"]
        assert r["chars_per_token"] == pytest.approx(r["chars"] / r["tokens"])
        assert r["chars_per_second"] == pytest.approx(r["chars"] / r["seconds"])
        assert r["tokens_per_second"] == pytest.approx(r["tokens"] / r["seconds"])
        results[name] = r
    # The extended tokenizer writes the same Japanese text in fewer tokens.
    assert results["ext"]["chars_per_token"] > 1.3 * results["base"]["chars_per_token"]
    assert results["ext"]["tokens"] < results["base"]["tokens"]
    assert abs(results["ext"]["chars"] - results["base"]["chars"]) <= 3  # same budget, up to one token's overshoot


def test_max_chars_respected_on_default_prompts(tiny_model_dir):
    """A random model on the built-in prompts: every continuation stops by the rule, never beyond it."""
    r, tok = _speed(tiny_model_dir, DEFAULT_PROMPTS, max_chars=12)
    assert len(r["per_prompt"]) == len(DEFAULT_PROMPTS) == 8
    for run in r["per_prompt"]:
        assert run["stop"] in ("max_chars", "eos", "max_tokens")
        if run["stop"] == "max_chars":  # reached with the last token, not before it
            assert run["chars"] >= 12
            assert len(tok.decode(run["token_ids"][:-1], skip_special_tokens=True).rstrip("\ufffd")) < 12
        if run["stop"] == "max_tokens":
            assert run["tokens"] == 4 * 12 + 16 and run["chars"] < 12
    assert r["tokens"] == sum(x["tokens"] for x in r["per_prompt"]) and r["seconds"] > 0


def test_cli_json_two_models(models, tmp_path, capsys, paragraph):
    prompts = tmp_path / "p.txt"
    prompts.write_text(paragraph[:PROMPT_CHARS] + "\n\n", encoding="utf-8")
    rc = main(["evaluate", "speed", "--model", models["base"], "--model", models["ext"], "--prompts", str(prompts),
               "--max-chars", str(MAX_CHARS), "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    r = json.loads(out)
    assert [m["model"] for m in r["models"]] == [models["base"], models["ext"]]
    for m in r["models"]:
        assert set(m) >= {"model", "chars_per_second", "chars_per_token", "tokens_per_second", "chars", "tokens",
                          "seconds"}
        assert m["chars"] >= MAX_CHARS
    assert r["speedup"] == pytest.approx(r["models"][1]["chars_per_second"] / r["models"][0]["chars_per_second"])
    assert r["models"][1]["chars_per_token"] > r["models"][0]["chars_per_token"]


@pytest.mark.parametrize("argv, key", [
    (["--model", "a", "--model", "b", "--model", "c"], "--model"),
    (["--max-chars", "0"], "--max-chars"),
    (["--prompts", "/nonexistent/prompts.txt"], "--prompts"),
])
def test_bad_input_before_loading(tiny_model_dir, capsys, argv, key):
    if "--model" not in argv:
        argv = ["--model", tiny_model_dir, *argv]
    rc = main(["evaluate", "speed", *argv, "--json"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and key in err


def test_empty_prompts_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text('{"prompt": ""}\n\n', encoding="utf-8")
    with pytest.raises(XltError, match="holds no prompts"):
        speed_json(["x"], str(p))
