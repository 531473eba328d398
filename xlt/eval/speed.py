"""Generation speed in Japanese characters: what a Japanese tokenizer buys at inference.

Tokens per second hides the tokenizer: a model whose tokenizer packs more characters into a token
writes more text per forward pass. So every model continues the same prompts greedily (KV cache on)
until its *decoded* continuation reaches the same number of characters (or EOS), and the result is
characters per second and characters per generated token. One warm-up generation per model is not
timed. Only the continuation is counted, never the prompt.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from xlt.config import XltError

#: Built-in Japanese prompts (varied register: encyclopaedic, conversational, instructional, news).
DEFAULT_PROMPTS = (
    "日本の首都は東京です。東京は",
    "富士山は日本で最も高い山で、",
    "昔々、ある村に一人のおじいさんが住んでいました。",
    "今日はとても良い天気なので、",
    "機械学習とは、データから規則性を学習する",
    "日本料理の特徴は、季節の食材を",
    "次の文章を読んで、質問に答えてください。",
    "京都には多くの寺院や神社があり、",
)


def _visible_chars(text: str) -> int:
    """Characters of ``text``, not counting trailing U+FFFD (a byte-level token ending mid-character)."""
    return len(text.rstrip("\ufffd"))


def _char_budget_criteria(tokenizer: Any, prompt_len: int, max_chars: int) -> Any:
    """A ``StoppingCriteria`` that stops once the decoded continuation holds ``max_chars`` characters.

    transformers offers token-count and stop-string criteria but none on decoded characters, hence this one.
    """
    import torch
    from transformers import StoppingCriteria

    class CharBudget(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
            done = [_visible_chars(tokenizer.decode(row[prompt_len:], skip_special_tokens=True)) >= max_chars
                    for row in input_ids]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return CharBudget()


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def _generate(model: Any, tokenizer: Any, prompt: str, max_chars: int) -> dict:
    """Greedy continuation of ``prompt`` up to ``max_chars`` decoded characters; timed."""
    import torch
    from transformers import StoppingCriteriaList

    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=True).to(model.device)
    n_prompt = enc["input_ids"].shape[1]
    # A cap on tokens so a model that emits only special tokens (decoding to nothing) still stops;
    # 4 tokens per character covers byte-level tokenizers (at most 4 UTF-8 bytes a character).
    max_new = 4 * max_chars + 16
    eos = tokenizer.eos_token_id
    _sync(model.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, num_beams=1, use_cache=True, max_new_tokens=max_new,
                             min_new_tokens=0, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                             stopping_criteria=StoppingCriteriaList([_char_budget_criteria(tokenizer, n_prompt,
                                                                                           max_chars)]))
    _sync(model.device)
    seconds = time.perf_counter() - t0
    new = out[0, n_prompt:].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    chars = _visible_chars(text)
    if eos is not None and new and new[-1] == eos:
        stop = "eos"
    elif chars >= max_chars:
        stop = "max_chars"
    else:
        stop = "max_tokens"
    return {"prompt": prompt, "text": text, "chars": chars, "tokens": len(new), "seconds": seconds, "stop": stop,
            "token_ids": new}


def generation_speed(model: Any, tokenizer: Any, prompts: Sequence[str] = DEFAULT_PROMPTS,
                     max_chars: int = 200) -> dict:
    """Greedy generation speed of ``model`` on ``prompts``, one prompt at a time, KV cache on.

    Returns ``{"chars_per_second", "chars_per_token", "tokens_per_second", "chars", "tokens", "seconds",
    "per_prompt"}``. Guarantees: each continuation stops at the first token that brings it to
    ``max_chars`` decoded characters, at EOS, or at ``4 * max_chars + 16`` tokens (``per_prompt[i]["stop"]``
    says which); ``chars`` counts continuation characters only (EOS and special tokens decode to nothing,
    a trailing partial character is not counted); ``tokens`` counts every generated token, EOS included;
    ``seconds`` sums the timed ``generate`` calls (prefill included) after one untimed warm-up.
    """
    prompts = [p for p in prompts if p]
    if not prompts:
        raise XltError("generation speed: no non-empty prompt")
    if max_chars <= 0:
        raise XltError(f"--max-chars: must be positive, got {max_chars}")
    was_training = model.training
    model.eval()
    _generate(model, tokenizer, prompts[0], min(max_chars, 16))  # warm-up: kernels, allocator, caches
    runs = [_generate(model, tokenizer, p, max_chars) for p in prompts]
    if was_training:
        model.train()
    chars = sum(r["chars"] for r in runs)
    tokens = sum(r["tokens"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    return {"chars_per_second": chars / seconds, "chars_per_token": chars / max(tokens, 1),
            "tokens_per_second": tokens / seconds, "chars": chars, "tokens": tokens, "seconds": seconds,
            "per_prompt": runs}


def read_prompts(path: str) -> list[str]:
    """Prompts from ``path``: ``.jsonl`` rows with a ``prompt`` (or ``text``) field, else one per non-empty line."""
    import os

    if not os.path.isfile(path):
        raise XltError(f"--prompts: file not found: {path}")
    prompts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise XltError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                value = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
                if not isinstance(value, str):
                    raise XltError(f"{path}:{lineno}: no string field 'prompt' or 'text'")
                if value.strip():
                    prompts.append(value)
            else:
                prompts.append(line.rstrip("\n"))
    if not prompts:
        raise XltError(f"--prompts: {path} holds no prompts")
    return prompts


def speed_json(model_specs: Sequence[str], prompts_path: str | None = None, max_chars: int = 200,
               trust_remote_code: bool = False) -> dict:
    """``xlt evaluate speed``: ``{"models": [...], "speedup"?}``; inputs checked before any model loads."""
    import torch

    from xlt.models import check_model_spec, load_model, load_tokenizer

    if not 1 <= len(model_specs) <= 2:
        raise XltError(f"--model: give one or two models, got {len(model_specs)}")
    if max_chars <= 0:
        raise XltError(f"--max-chars: must be positive, got {max_chars}")
    prompts = read_prompts(prompts_path) if prompts_path else list(DEFAULT_PROMPTS)
    for spec in model_specs:
        check_model_spec(spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = []
    for spec in model_specs:
        tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
        model = load_model(spec, trust_remote_code=trust_remote_code).to(device)
        r = generation_speed(model, tokenizer, prompts, max_chars)
        r.pop("per_prompt")
        models.append({"model": spec, **r})
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    out: dict[str, Any] = {"models": models, "max_chars": max_chars, "prompts": len(prompts), "device": device}
    if len(models) == 2:
        out["speedup"] = models[1]["chars_per_second"] / models[0]["chars_per_second"]
    return out
