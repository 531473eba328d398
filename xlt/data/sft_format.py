"""SFT prompt formats: conversations -> text + trained character spans -> token ids + labels.

A conversation is a list of turns ``{"role": "system"|"user"|"assistant", "content": str}`` (a user turn may
carry ``"input"``, Alpaca's input field). Two formats:

* ``stablelm_alpaca``: the Japanese StableLM Instruct Alpaca prompt; a multi-turn dialogue continues with
  further ``### 指示:`` / ``### 応答:`` blocks; every assistant turn ends with the tokenizer's EOS text.
* ``chat``: the tokenizer's chat template (or ChatML, installed by :func:`install_chatml`).

The loss mask is decided on *characters* and mapped to tokens through the fast tokenizer's offsets, so
the text is tokenised once, exactly as the model sees it. Why not TRL's ``assistant_only_loss``: it needs
``{% generation %}`` markers in the template (most templates have none) and its prompt/completion split
tokenises the two halves separately, which byte-level pre-tokenizers cut differently at a string end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from xlt.config import XltError
from xlt.data.sft import STABLELM_SYSTEM

PROMPT_FORMATS = ("stablelm_alpaca", "chat")
SFT_INFO_FILE = "xlt_sft.json"  # written last into an xlt sft/ folder: the prompt format and stop tokens it trained
IGNORE_INDEX = -100
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# ChatML as used by Qwen / SmolLM2-Instruct, without a default system prompt.
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                   "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")
_SEP = "\n\n### "


@dataclass
class Rendered:
    """``text`` and the character spans ``trained`` (half-open, sorted, disjoint) that carry loss."""

    text: str
    trained: list[tuple[int, int]]


@dataclass
class TokenizedExample:
    """One example as the model trains on it.

    ``labels[i]`` is ``input_ids[i]`` on trained tokens and -100 elsewhere (not shifted: the model shifts).
    ``text`` is the text the kept tokens cover (cut after the last kept token when ``truncated``);
    ``trained`` are the character spans of ``text`` covered by the trained tokens (adjacent tokens merged).
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    text: str
    trained: list[tuple[int, int]]


def check_prompt_format(prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise XltError(f"prompt_format={prompt_format!r}: expected {' or '.join(PROMPT_FORMATS)}")


def _content(turn: dict) -> str:
    """A turn's content; a user turn's ``input`` is appended after a blank line (chat formats)."""
    text = turn.get("content") or ""
    if turn.get("input"):
        text += "\n\n" + turn["input"]
    return text


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def _render_stablelm(messages: Sequence[dict], tokenizer: Any, generation_prompt: bool = False) -> Rendered:
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise XltError("prompt_format=stablelm_alpaca: the tokenizer has no eos_token to end a response with")
    text = STABLELM_SYSTEM
    trained = []
    for i, turn in enumerate(messages):
        role = turn.get("role")
        if role == "system":
            if i:
                raise XltError(f"prompt_format=stablelm_alpaca: a system turn must come first (turn {i})")
            text = turn.get("content") or ""
        elif role == "user":
            text += _SEP + "指示: \n" + (turn.get("content") or "")
            if turn.get("input"):
                text += _SEP + "入力: \n" + turn["input"]
        elif role == "assistant":
            text += _SEP + "応答: \n"
            start = len(text)
            text += (turn.get("content") or "") + eos
            trained.append((start, len(text)))
        else:
            raise XltError(f"conversation turn {i}: unknown role {role!r} (expected system, user or assistant)")
    if generation_prompt:
        text += _SEP + "応答: \n"
    return Rendered(text, trained)


def _apply_template(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise XltError("prompt_format=chat: the tokenizer has no chat template (set chat_template: chatml, or "
                       "prompt_format: stablelm_alpaca)")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja2 / template errors: one line naming the cause
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise XltError(f"prompt_format=chat: the chat template failed on a conversation: {first}") from None


def _special_strings(tokenizer: Any) -> list[str]:
    """The text of every special token (the end-of-turn marker of a template is one of these)."""
    out = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            out.add(str(tok))
    return sorted((s for s in out if s), key=len, reverse=True)


def _turn_end(tokenizer: Any, text: str, start: int) -> int:
    """End of the assistant turn that starts at ``start`` in ``text`` (a rendering that ends with that turn).

    The turn ends with the first special token after ``start`` (``<|im_end|>``, ``<|eot_id|>``, ``</s>``...),
    which is trained; what follows it (a newline, the next role header) is not. A template that closes turns
    with plain text has its closing text trained, trailing whitespace excluded.
    """
    hits = [(p, p + len(s)) for s in _special_strings(tokenizer) if (p := text.find(s, start)) >= 0]
    if hits:
        return min(hits)[1]
    return len(text.rstrip())


def _render_chat(messages: Sequence[dict], tokenizer: Any) -> Rendered:
    msgs = [{"role": t.get("role"), "content": _content(t)} for t in messages]
    full = _apply_template(tokenizer, msgs, False)
    trained = []
    for i, turn in enumerate(msgs):
        if turn["role"] != "assistant":
            continue
        if i == 0:
            raise XltError("prompt_format=chat: a conversation starts with an assistant turn (no prompt before it)")
        prefix = _apply_template(tokenizer, msgs[:i], True)
        upto = full if i == len(msgs) - 1 else _apply_template(tokenizer, msgs[:i + 1], False)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise XltError(f"prompt_format=chat: the chat template is not prefix-stable (the rendering up to "
                           f"assistant turn {i} does not begin the full one), so its trained tokens cannot be "
                           "located; use chat_template: chatml or prompt_format: stablelm_alpaca")
        start = len(prefix)
        body = turn["content"].strip()
        at = upto.find(body, start) if body else -1
        after = at + len(body) if at >= 0 else start
        end = _turn_end(tokenizer, upto, after)
        if end > start:
            trained.append((start, end))
    return Rendered(full, trained)


def render(messages: Sequence[dict], prompt_format: str, tokenizer: Any) -> Rendered:
    """The conversation's text and the character spans that carry loss.

    Guarantees: every assistant turn contributes one span, from the first character the model generates
    after its prompt to the end of its stop marker (the EOS text for ``stablelm_alpaca``; the template's
    end-of-turn special token for ``chat``); system / user text and role headers are never in a span.
    A chat template that does not render conversations prefix-stably is one ``XltError`` line.
    """
    check_prompt_format(prompt_format)
    if prompt_format == "stablelm_alpaca":
        return _render_stablelm(messages, tokenizer)
    return _render_chat(messages, tokenizer)


def generation_prompt(messages: Sequence[dict], prompt_format: str, tokenizer: Any) -> str:
    """The text a model continues to answer the conversation (which ends with a user turn), as in training."""
    check_prompt_format(prompt_format)
    if prompt_format == "stablelm_alpaca":
        return _render_stablelm(messages, tokenizer, generation_prompt=True).text
    msgs = [{"role": t.get("role"), "content": _content(t)} for t in messages]
    return _apply_template(tokenizer, msgs, True)


def generation_prompt_ids(messages: Sequence[dict], prompt_format: str, tokenizer: Any) -> list[int]:
    """Token ids the model continues to answer ``messages`` (ending with a user turn), as in training.

    Cut from the tokenisation of the conversation with a one-letter answer appended, up to that answer's
    first trained token: tokenising :func:`generation_prompt`'s text alone would cut its final whitespace differently
    (byte-level pre-tokenizers make " \n" one token at a string end but " ", "\n" before the answer).
    """
    ex = tokenize_example(list(messages) + [{"role": "assistant", "content": "A"}], prompt_format, tokenizer, None)
    starts = [j for j, lab in enumerate(ex.labels) if lab != IGNORE_INDEX and (j == 0 or ex.labels[j - 1] == IGNORE_INDEX)]
    first = starts[-1] if starts else None
    if first is None:
        raise XltError(f"prompt_format={prompt_format}: cannot locate where the answer starts")
    return ex.input_ids[:first]


# ---------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------
def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's default encoding (``add_special_tokens=True``) starts with its BOS token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_sp) > len(without) and with_sp[0] == bos


def _inside(a: int, b: int, spans: Sequence[tuple[int, int]]) -> bool:
    return b > a and any(s <= a and b <= e for s, e in spans)


def _merge_spans(offsets: Sequence[tuple[int, int]], mask: Sequence[bool]) -> list[tuple[int, int]]:
    """Character spans of the runs of consecutive masked tokens."""
    out: list[tuple[int, int]] = []
    prev = False
    for (a, b), m in zip(offsets, mask):
        if m:
            if prev and out:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
        prev = m
    return out


def tokenize_rendered(rendered: Rendered, tokenizer: Any, max_length: Optional[int]) -> TokenizedExample:
    """Tokenise ``rendered.text`` once (with offsets) and label the tokens inside the trained spans.

    A token is trained iff its whole character span lies inside a trained span. A token straddling a
    span boundary (a merge across the prompt / response seam) is not trained: it would teach prompt
    characters. Byte-fallback and byte-level pieces of one character all carry that character's span, so
    they are trained together. One BOS is prepended when the tokenizer's default adds one and the text does
    not already start with the BOS string (chat templates that write it). ``max_length`` cuts the tail.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise XltError("SFT needs a fast tokenizer (tokenizer.json) for character offsets")
    text = rendered.text
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    bos = getattr(tokenizer, "bos_token", None)
    if adds_bos(tokenizer) and not (bos and text.startswith(bos)):
        ids.insert(0, tokenizer.bos_token_id)
        offsets.insert(0, (0, 0))
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, offsets = ids[:max_length], offsets[:max_length]
        text = text[:max((b for _, b in offsets), default=0)]
    mask = [_inside(a, b, rendered.trained) for a, b in offsets]
    labels = [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]
    return TokenizedExample(ids, labels, truncated, text, _merge_spans(offsets, mask))


def tokenize_example(messages: Sequence[dict], prompt_format: str, tokenizer: Any,
                     max_length: Optional[int]) -> TokenizedExample:
    """:func:`render` then :func:`tokenize_rendered`."""
    return tokenize_rendered(render(messages, prompt_format, tokenizer), tokenizer, max_length)


def build_sft_dataset(examples: Sequence[dict], prompt_format: str, tokenizer: Any,
                      max_length: Optional[int]) -> tuple[list[dict], dict[str, dict[str, int]]]:
    """Rows ``{"input_ids", "labels"}`` in the order of ``examples`` and counts per ``source``.

    ``truncated`` counts every example cut at ``max_length``; ``fully_masked`` counts examples left with no
    trained token (e.g. the response fell past ``max_length``): those are dropped, every other one is kept.
    """
    rows, counts = [], {}
    for ex in examples:
        c = counts.setdefault(ex.get("source") or "unknown", {"truncated": 0, "fully_masked": 0})
        t = tokenize_example(ex["messages"], prompt_format, tokenizer, max_length)
        c["truncated"] += t.truncated
        if all(label == IGNORE_INDEX for label in t.labels):
            c["fully_masked"] += 1
            continue
        rows.append({"input_ids": t.input_ids, "labels": t.labels})
    return rows, counts


# ---------------------------------------------------------------------------------------------
# ChatML and stop tokens
# ---------------------------------------------------------------------------------------------
def _old_pieces(tokenizer: Any, text: str) -> list[int]:
    """Ids of ``text`` under the tokenizer's BPE model alone (as the tokenizer stage builds ``pieces``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [t.id for t in backend.model.tokenize(text)]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chatml_pieces(tokenizer: Any) -> dict[str, list[int]]:
    """The ChatML tokens ``tokenizer`` lacks, each with its ids under the tokenizer's BPE model alone (what a new
    embedding row is initialised from). Call it before :func:`install_chatml` adds them."""
    vocab = tokenizer.get_vocab()
    return {t: _old_pieces(tokenizer, t) for t in CHATML_TOKENS if t not in vocab}


def install_chatml(tokenizer: Any) -> list[str]:
    """Give ``tokenizer`` the ChatML template; returns the special tokens it had to add.

    ``<|im_start|>`` / ``<|im_end|>`` are added as special tokens when missing; ``eos_token`` becomes
    ``<|im_end|>`` (generation stops there); a tokenizer without a pad token gets its old EOS. The model's side
    (new rows, generation config) is ``xlt.train.sft.grow_for_chatml``.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in CHATML_TOKENS if t not in vocab]
    old_eos = tokenizer.eos_token
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None and old_eos:
        tokenizer.pad_token = old_eos
    tokenizer.eos_token = "<|im_end|>"
    return missing


def stop_token_ids(prompt_format: str, tokenizer: Any) -> list[int]:
    """Token ids that end a response in ``prompt_format`` (for generation_config.json ``eos_token_id``).

    ``stablelm_alpaca``: the EOS id. ``chat``: the template's end-of-turn token (found by rendering a probe
    conversation, the same way the trained spans are found), then EOS when it differs.
    """
    check_prompt_format(prompt_format)
    out: list[int] = []
    if prompt_format == "chat":
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        r = _render_chat(probe, tokenizer)
        if r.trained:
            s, e = r.trained[-1]
            marker = next((m for m in _special_strings(tokenizer) if r.text[s:e].endswith(m)), None)
            if marker is not None:
                out.append(tokenizer.convert_tokens_to_ids(marker))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in out:
        out.append(tokenizer.eos_token_id)
    if not out:
        raise XltError(f"prompt_format={prompt_format}: the tokenizer has no end-of-turn or EOS token")
    return out
