"""Instruction data: dataset adapters → (instruction, input, output) → prompt / completion.

Adapters map each public Japanese instruction set's columns onto one shape, so recipes can mix
them; the prompt is Japanese StableLM's Alpaca format (or the tokenizer's chat template).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Optional

from xlt.config import XltError
from xlt.validate import AT_LEAST_1, check_spec, check_utf8_file, decode_line

# Japanese StableLM Instruct Alpaca prompt (stabilityai/japanese-stablelm-instruct-alpha model card).
STABLELM_SYSTEM = "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"


def stablelm_alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The prompt up to ``### 応答: ``; the completion starts with the format's ``\n``.

    Why the newline goes with the completion: byte-level pre-tokenizers cut a trailing " \n" differently
    at the end of a string than before text, so a prompt ending in it would not be a token prefix of
    prompt + completion and the loss mask would slip. The concatenated text is exactly the StableLM format.
    """
    sep = "\n\n### "
    prompt = STABLELM_SYSTEM + sep + "指示: \n" + instruction
    if input_text:
        prompt += sep + "入力: \n" + input_text
    return prompt + sep + "応答: "


COMPLETION_PREFIX = {"stablelm_alpaca": "\n", "chat": ""}


def _alpaca(row: dict) -> Optional[dict]:
    return {"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]}


def _dolly(row: dict) -> Optional[dict]:
    # kunishou/databricks-dolly-15k-ja keeps Alpaca-style names; the original Dolly uses context/response.
    return {"instruction": row["instruction"], "input": row.get("input") or row.get("context") or "",
            "output": row.get("output") if row.get("output") is not None else row["response"]}


def _hh_rlhf(row: dict) -> Optional[dict]:
    # kunishou/hh-rlhf-49k-ja flags machine translations that failed review with ng_translation == "1".
    if str(row.get("ng_translation", "0")) == "1":
        return None
    return {"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]}


ADAPTERS: dict[str, tuple[Callable[[dict], Optional[dict]], tuple[str, ...]]] = {
    "alpaca": (_alpaca, ("instruction", "output")),
    "dolly": (_dolly, ("instruction",)),
    "hh_rlhf": (_hh_rlhf, ("instruction", "output")),
    "chatterbot": (_alpaca, ("instruction", "output")),
}
# The fields of an instruction-set spec and their types (None, i.e. absent, is allowed for each).
_SPEC_TYPES: dict[str, type] = {"adapter": str, "dataset": str, "path": str, "embedded": str, "split": str,
                                "config": str, "max_examples": int, "name": str}
_SPEC_KEYS = set(_SPEC_TYPES)


def check_sft_specs(specs: Optional[list[dict]]) -> None:
    """Validate instruction-set specs (keys, adapter names, files, columns) before loading a model."""
    import os

    if not specs:
        raise XltError("sft_datasets: the recipe lists no instruction data")
    if not isinstance(specs, list):
        raise XltError(f"sft_datasets: expected a list of mappings, got {type(specs).__name__}")
    for i, spec in enumerate(specs):
        where = f"sft_datasets[{i}]"
        if not isinstance(spec, dict):
            raise XltError(f"{where}: expected a mapping, got {spec!r}")
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise XltError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        check_spec(where, spec, _SPEC_TYPES, {"max_examples": AT_LEAST_1})
        if spec.get("adapter") not in ADAPTERS:
            raise XltError(f"{where}: adapter must be one of {', '.join(ADAPTERS)} (got {spec.get('adapter')!r})")
        kinds = [k for k in ("dataset", "path", "embedded") if spec.get(k)]
        if len(kinds) != 1:
            raise XltError(f"{where}: give exactly one of dataset, path or embedded")
        if spec.get("path"):
            if not os.path.isfile(spec["path"]):
                raise XltError(f"{where}: data file not found: {spec['path']}")
            check_utf8_file(spec["path"], where)  # read after the model loads: a bad byte anywhere, now
            rows = _read_jsonl(spec["path"], limit=1, key=where)
            if not rows:
                raise XltError(f"{where}: {spec['path']} holds no examples")
            required = ADAPTERS[spec["adapter"]][1]
            missing = [c for c in required if rows and c not in rows[0]]
            if missing:
                raise XltError(f"{where}: {spec['path']} has no field {missing[0]!r} (fields: {', '.join(rows[0])})")
        if spec.get("embedded") and spec["embedded"] != "chatterbot-ja":
            raise XltError(f"{where}: unknown embedded instruction set {spec['embedded']!r} (choose chatterbot-ja)")


def _read_jsonl(path: str, limit: Optional[int] = None, key: str = "sft_datasets") -> list[dict]:
    """JSON objects, one a line; an undecodable line, invalid JSON or a non-object names the file and line."""
    import json

    rows = []
    with open(path, "rb") as f:  # decoded line by line, so an encoding error names its line
        for lineno, raw in enumerate(f, 1):
            line = decode_line(raw, path, lineno, key)
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise XltError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise XltError(f"{key}: {path}:{lineno}: expected a JSON object per line, "
                                   f"got {type(row).__name__}")
                rows.append(row)
                if limit and len(rows) >= limit:
                    break
    return rows


def _rows(spec: dict, key: str = "sft_datasets") -> Iterable[dict]:
    if spec.get("embedded"):
        from xlt.embedded import embedded_instruction_pairs

        return embedded_instruction_pairs("ja")
    if spec.get("path"):
        return _read_jsonl(spec["path"], key=key)
    import datasets

    try:
        return datasets.load_dataset(spec["dataset"], spec.get("config"), split=spec.get("split", "train"))
    except Exception as e:  # noqa: BLE001 - re-raised naming the dataset
        raise XltError(f"sft_datasets: cannot load {spec['dataset']!r}: {str(e).splitlines()[0]}") from None


def load_instruction_examples(specs: list[dict], prompt_format: str = "stablelm_alpaca",
                              tokenizer: Any = None) -> list[dict]:
    """All examples as ``{"prompt", "completion"}`` (TRL's prompt-completion format: loss on the completion)."""
    check_sft_specs(specs)
    out = []
    for i, spec in enumerate(specs):
        adapt = ADAPTERS[spec["adapter"]][0]
        n = 0
        for row in _rows(spec, f"sft_datasets[{i}]"):
            ex = adapt(dict(row))
            if ex is None or not ex["instruction"].strip() or not ex["output"].strip():
                continue
            out.append({"prompt": format_prompt(ex["instruction"], ex["input"], prompt_format, tokenizer),
                        "completion": COMPLETION_PREFIX[prompt_format] + ex["output"]})
            n += 1
            if spec.get("max_examples") and n >= spec["max_examples"]:
                break
        if n == 0:
            raise XltError(f"sft_datasets[{i}]: no usable examples")
    return out


def format_prompt(instruction: str, input_text: str = "", prompt_format: str = "stablelm_alpaca",
                  tokenizer: Any = None) -> str:
    if prompt_format == "stablelm_alpaca":
        return stablelm_alpaca_prompt(instruction, input_text)
    if prompt_format == "chat":
        if tokenizer is None or not tokenizer.chat_template:
            raise XltError("prompt_format=chat needs a tokenizer with a chat template")
        content = instruction + ("\n\n" + input_text if input_text else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    raise XltError(f"prompt_format={prompt_format!r}: expected stablelm_alpaca or chat")
