"""Instruction data: dataset layouts → conversations → a deduplicated, weighted mixture with a held-out split.

An example is ``{"messages": [turn, ...], "source": name}``; a turn is ``{"role": "system"|"user"|"assistant",
"content": str}`` and a user turn may carry ``"input"`` (Alpaca's input field). Each public instruction set's
real column layout has one converter (``LAYOUTS``); an adapter (``ADAPTERS``) names the layouts it accepts,
picked by the columns present, and ``auto`` tries them all. Rendering and tokenizing: xlt/data/sft_format.py.

Everything a recipe can get wrong (keys, types, adapter, file, encoding, columns, first rows, hub access) is
found by ``check_sft_specs`` before any model loads; ``load_sft_data`` then accounts for every row read:

    rows == empty + failed_translation + malformed + duplicates + capped + eval + subsampled + train_unique
    train == train_unique + repeated

(``SFT_COUNT_KEYS`` documents each count.)
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from xlt.config import XltError
from xlt.validate import AT_LEAST_1, POSITIVE, check_spec, check_utf8_file, decode_line, decode_text

# Japanese StableLM Instruct Alpaca prompt (stabilityai/japanese-stablelm-instruct-alpha model card).
STABLELM_SYSTEM = "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"


# ---------------------------------------------------------------------------------------------
# Row → conversation
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Drop:
    """Why a row gives no example: ``reason`` is a count key (empty, failed_translation, malformed)."""

    reason: str
    detail: str = ""


Converted = Union[list[dict], Drop]


def _text(row: dict, key: str) -> Optional[str]:
    """The row's string field (None or absent → ""); None when the value is not a string (malformed)."""
    v = row.get(key)
    if v is None:
        return ""
    return v if isinstance(v, str) else None


def _finish(turns: list[dict]) -> Converted:
    """Validate a conversation: optional system turn first, then user / assistant alternating from a user turn.

    A last user turn (no answer, so never trained) is trimmed; no assistant turn or a blank user / assistant
    turn → ``empty``; any other order → ``malformed``.
    """
    body = turns[1:] if turns and turns[0]["role"] == "system" else turns
    if body and body[-1]["role"] == "user":
        body = body[:-1]
        turns = turns[: len(turns) - 1]
    if not body:
        return Drop("empty", "no assistant turn")
    for i, t in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if t["role"] != want:
            return Drop("malformed", f"turn {i + 1 + len(turns) - len(body)} is {t['role']}, expected {want}")
    if any(not t["content"].strip() for t in body):
        return Drop("empty", "a blank turn")
    return turns


def _user(content: str, input_text: str = "") -> dict:
    turn = {"role": "user", "content": content}
    if input_text.strip():
        turn["input"] = input_text
    return turn


def _pair(instruction: Optional[str], input_text: Optional[str], output: Optional[str]) -> Converted:
    if instruction is None or input_text is None or output is None:
        return Drop("malformed", "a field is not a string")
    return _finish([_user(instruction, input_text), {"role": "assistant", "content": output}])


def _alpaca(row: dict) -> Converted:
    # fujiki/japanese_alpaca_data, tatsu-lab/alpaca (its `text` column, a pre-rendered prompt, is ignored),
    # kunishou/databricks-dolly-15k-ja (Alpaca names plus index / category).
    return _pair(_text(row, "instruction"), _text(row, "input"), _text(row, "output"))


def _dolly(row: dict) -> Converted:
    # databricks/databricks-dolly-15k: the context (often empty) plays Alpaca's input.
    return _pair(_text(row, "instruction"), _text(row, "context"), _text(row, "response"))


def _hh_rlhf_ja(row: dict) -> Converted:
    # kunishou/hh-rlhf-49k-ja flags machine translations that failed review with ng_translation == "1".
    if str(row.get("ng_translation", "0")).strip() == "1":
        return Drop("failed_translation")
    return _alpaca(row)


_HH_SPEAKER = re.compile(r"(?:\A|\n\n)(Human|Assistant):")


def parse_hh_dialogue(text: Any) -> Converted:
    """Anthropic/hh-rlhf ``chosen`` text (``\\n\\nHuman: ...\\n\\nAssistant: ...`` repeated) → alternating turns."""
    if not isinstance(text, str):
        return Drop("malformed", "chosen is not a string")
    parts = _HH_SPEAKER.split(text)
    if parts[0].strip():
        return Drop("malformed", "text before the first 'Human:'")
    turns = [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
             for who, said in zip(parts[1::2], parts[2::2])]
    if not turns:
        return Drop("malformed", "no 'Human:' / 'Assistant:' turns")
    return _finish(turns)


def _hh_rlhf(row: dict) -> Converted:
    return parse_hh_dialogue(row.get("chosen"))


_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "model": "assistant"}


def _turns(value: Any, column: str) -> Converted:
    """A list of ``{role, content}`` (or ShareGPT ``{from, value}``) dicts → turns (roles normalised)."""
    if not isinstance(value, list):
        return Drop("malformed", f"{column} is not a list")
    out = []
    for i, t in enumerate(value, 1):
        if not isinstance(t, dict):
            return Drop("malformed", f"{column} turn {i} is not a mapping")
        role, content = t.get("role", t.get("from")), t.get("content", t.get("value"))
        if str(role).lower() not in _ROLES:
            return Drop("malformed", f"{column} turn {i} has role {role!r} (expected system, user or assistant)")
        if content is None:
            content = ""
        if not isinstance(content, str):
            return Drop("malformed", f"{column} turn {i}: content is not a string")
        out.append({"role": _ROLES[str(role).lower()], "content": content})
    return _finish(out)


def _messages(row: dict) -> Converted:
    return _turns(row.get("messages"), "messages")


def _conversations(row: dict) -> Converted:
    return _turns(row.get("conversations"), "conversations")


@dataclass(frozen=True)
class Layout:
    """One real column layout: the columns that identify it and its row converter."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    convert: Callable[[dict], Converted]
    datasets: str

    def describe(self) -> str:
        cols = list(self.required) + [c + "?" for c in self.optional]
        return f"{self.name} ({', '.join(cols)}{': ' + self.datasets if self.datasets else ''})"


LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (
    Layout("messages", ("messages",), (), _messages, "[{role, content}, ...]"),
    Layout("conversations", ("conversations",), (), _conversations, "ShareGPT [{from, value}, ...]"),
    Layout("hh_rlhf", ("chosen",), ("rejected",), _hh_rlhf, "Anthropic/hh-rlhf"),
    Layout("hh_rlhf_ja", ("instruction", "output", "ng_translation"), ("input",), _hh_rlhf_ja,
           "kunishou/hh-rlhf-49k-ja"),
    Layout("dolly", ("instruction", "response"), ("context", "category"), _dolly, "databricks/databricks-dolly-15k"),
    Layout("alpaca", ("instruction", "output"), ("input",), _alpaca,
           "fujiki/japanese_alpaca_data, tatsu-lab/alpaca, kunishou/databricks-dolly-15k-ja"),
)}

# Adapter name → the layouts it accepts, tried in order (the first whose columns are all present wins).
ADAPTERS: dict[str, tuple[str, ...]] = {
    "alpaca": ("alpaca",),
    "dolly": ("dolly", "alpaca"),
    "hh_rlhf": ("hh_rlhf", "hh_rlhf_ja", "alpaca"),
    "messages": ("messages", "conversations"),
    "chatterbot": ("alpaca",),
    "auto": tuple(LAYOUTS),
}
EMBEDDED = {"chatterbot-ja": "ja", "chatterbot-en": "en"}


def match_layout(adapter: str, columns: list[str], where: str, what: str) -> Layout:
    """The adapter's first layout whose required columns are all in ``columns``; else one line listing them."""
    for name in ADAPTERS[adapter]:
        if all(c in columns for c in LAYOUTS[name].required):
            return LAYOUTS[name]
    fields = ", ".join(columns) or "none"
    layouts = [LAYOUTS[n] for n in ADAPTERS[adapter]]
    if len(layouts) == 1:
        missing = next(c for c in layouts[0].required if c not in columns)
        raise XltError(f"{where}: {what} has no field {missing!r} (fields: {fields}); adapter {adapter} expects "
                       f"{layouts[0].describe()}")
    raise XltError(f"{where}: {what} matches no layout of adapter {adapter} (fields: {fields}); expected one of: "
                   + "; ".join(lay.describe() for lay in layouts))


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------
# The fields of an instruction-set spec and their types (None, i.e. absent, is allowed for each).
_SPEC_TYPES: dict[str, type] = {"adapter": str, "dataset": str, "path": str, "embedded": str, "split": str,
                                "config": str, "max_examples": int, "name": str, "weight": float}
_SPEC_RULES = {"max_examples": AT_LEAST_1, "weight": POSITIVE}
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_HEAD_ROWS = 20  # rows read to find the columns and judge the first conversions


def spec_name(spec: dict) -> str:
    """The dataset's name in counts and examples: ``name``, else the hub id (config, split), file name or corpus."""
    if spec.get("name"):
        return spec["name"]
    if spec.get("dataset"):
        name = spec["dataset"] + (f":{spec['config']}" if spec.get("config") else "")
        return name + (f"[{spec['split']}]" if spec.get("split", "train") != "train" else "")
    if spec.get("path"):
        return os.path.basename(spec["path"])
    return str(spec.get("embedded"))


def _check_spec_fields(where: str, spec: Any) -> None:
    if not isinstance(spec, dict):
        raise XltError(f"{where}: expected a mapping, got {spec!r}")
    unknown = set(spec) - set(_SPEC_TYPES)
    if unknown:
        raise XltError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (keys: {', '.join(_SPEC_TYPES)})")
    check_spec(where, spec, _SPEC_TYPES, _SPEC_RULES)
    adapter = spec.get("adapter", "auto")
    if adapter not in ADAPTERS:
        raise XltError(f"{where}: adapter must be one of {', '.join(ADAPTERS)} (got {adapter!r})")
    kinds = [k for k in ("dataset", "path", "embedded") if spec.get(k)]
    if len(kinds) != 1:
        raise XltError(f"{where}: give exactly one of dataset, path or embedded")
    if spec.get("embedded"):
        if spec["embedded"] not in EMBEDDED:
            raise XltError(f"{where}: unknown embedded instruction set {spec['embedded']!r} "
                           f"(choose {' or '.join(EMBEDDED)})")
        if adapter not in ("chatterbot", "alpaca", "auto"):
            raise XltError(f"{where}: embedded {spec['embedded']} holds chatterbot pairs; use adapter chatterbot")
    if spec.get("path"):
        path = spec["path"]
        if not path.endswith(_FILE_SUFFIXES):
            raise XltError(f"{where}: {path}: expected a .jsonl, .json or .parquet file")
        if not os.path.isfile(path):
            raise XltError(f"{where}: data file not found: {path}")
        if not os.access(path, os.R_OK):
            raise XltError(f"{where}: cannot read {path} (permission denied)")


def check_sft_specs(specs: Optional[list[dict]], hub: bool = True) -> None:
    """Every instruction-set spec is usable, checked before any model loads; else one ``XltError`` line.

    Keys and types, adapter and embedded names, distinct dataset names; a local file exists, is UTF-8 (the
    whole file) and parses (every row); the first rows' columns match a layout of the adapter and are not all
    malformed. ``dataset`` specs: the first rows are read with ``datasets`` streaming (hub ids are skipped when
    ``hub`` is False, as ``xlt check --offline`` does); any failure is one line naming the spec.
    """
    if not specs:
        raise XltError("sft_datasets: the recipe lists no instruction data")
    if not isinstance(specs, list):
        raise XltError(f"sft_datasets: expected a list of mappings, got {_kind_of(specs)}")
    names: dict[str, int] = {}
    for i, spec in enumerate(specs):
        where = f"sft_datasets[{i}]"
        _check_spec_fields(where, spec)
        name = spec_name(spec)
        if name in names:
            raise XltError(f"{where}: dataset name {name!r} is also sft_datasets[{names[name]}]'s; "
                           "give each a distinct `name`")
        names[name] = i
    for i, spec in enumerate(specs):
        if spec.get("dataset") and not hub and not os.path.exists(spec["dataset"]):
            continue  # a hub id, not contacted (a local dataset folder is still read)
        where = f"sft_datasets[{i}]"
        columns, head, what = _head(spec, where)
        if not head:
            raise XltError(f"{where}: {what} holds no examples")
        layout = match_layout(spec.get("adapter", "auto"), columns, where, what)
        results = [(loc, layout.convert(row)) for loc, row in head]
        bad = [(loc, r) for loc, r in results if isinstance(r, Drop) and r.reason == "malformed"]
        if len(bad) == len(results):
            loc, r = bad[0]
            raise XltError(f"{where}: {loc}: not a {layout.name} conversation ({r.detail})")


def _kind_of(value: Any) -> str:
    return "a mapping" if isinstance(value, dict) else type(value).__name__


# ---------------------------------------------------------------------------------------------
# Reading rows: (location, row) pairs, the location naming the file and line / row for messages
# ---------------------------------------------------------------------------------------------
def _json_rows(path: str, where: str) -> Iterator[tuple[str, dict]]:
    """A .jsonl file (one object a line) or a .json file (an array of objects, or JSON Lines)."""
    with open(path, "rb") as f:
        head = f.read(4096)
        start = head.lstrip()[:1]
        if path.endswith(".json") and start == b"[":  # a JSON array (how several instruction sets ship)
            text = decode_text(head + f.read(), path, where)
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise XltError(f"{where}: {path}:{e.lineno}: invalid JSON ({e.msg})") from None
            for j, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise XltError(f"{where}: {path}[{j}]: expected a JSON object, got {type(row).__name__}")
                yield f"{path}[{j}]", row
            return
        f.seek(0)
        for lineno, raw in enumerate(f, 1):  # decoded line by line, so an encoding error names its line
            line = decode_line(raw, path, lineno, where)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise XltError(f"{where}: {path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise XltError(f"{where}: {path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            yield f"{path}:{lineno}", row


def _parquet_table(path: str, where: str) -> Any:
    # pyarrow directly (what `datasets` reads parquet with): no dataset cache written for a local file.
    import pyarrow.parquet as pq

    from xlt.data.sources import read_parquet_checked

    return read_parquet_checked(path, where, pq.read_table)


def _rows(spec: dict, where: str) -> tuple[list[str], Iterator[tuple[str, dict]], str]:
    """(columns, rows, what): every row of the spec's data, its columns and how messages name it."""
    if spec.get("embedded"):
        from xlt.embedded import embedded_instruction_pairs

        pairs = embedded_instruction_pairs(EMBEDDED[spec["embedded"]])
        what = f"embedded {spec['embedded']}"
        return ["instruction", "input", "output"], ((f"{what} pair {j}", r) for j, r in enumerate(pairs)), what
    if spec.get("path"):
        path = spec["path"]
        if path.endswith(".parquet"):
            table = _parquet_table(path, where)
            return table.column_names, ((f"{path} row {j}", r) for j, r in enumerate(table.to_pylist())), path
        rows = _json_rows(path, where)
        first = list(itertools.islice(rows, _HEAD_ROWS))
        return _columns(r for _, r in first), itertools.chain(first, rows), path
    import datasets

    what = f"dataset {spec['dataset']!r}"
    try:
        ds = datasets.load_dataset(spec["dataset"], spec.get("config"), split=spec.get("split", "train"))
    except Exception as e:  # noqa: BLE001 - re-raised as one line naming the dataset
        raise XltError(f"{where}: cannot load {what}: {_first_line(e)}") from None
    return list(ds.column_names), ((f"{what} row {j}", r) for j, r in enumerate(ds)), what


def _head(spec: dict, where: str) -> tuple[list[str], list[tuple[str, dict]], str]:
    """(columns, first rows, what) — cheap: a hub dataset is streamed; local files are read in full (parsed)."""
    if spec.get("dataset"):
        import datasets

        what = f"dataset {spec['dataset']!r}"
        try:
            ds = datasets.load_dataset(spec["dataset"], spec.get("config"), split=spec.get("split", "train"),
                                       streaming=True)
            head = [(f"{what} row {j}", dict(r)) for j, r in enumerate(itertools.islice(ds, _HEAD_ROWS))]
            columns = list(ds.column_names or _columns(r for _, r in head))
        except Exception as e:  # noqa: BLE001 - one line naming the spec and dataset
            raise XltError(f"{where}: cannot read {what}: {_first_line(e)}") from None
        return columns, head, what
    if spec.get("path") and not spec["path"].endswith(".parquet"):
        check_utf8_file(spec["path"], where)  # the whole file: a bad byte anywhere is found now
        columns, rows, what = _rows(spec, where)
        rows = list(rows)  # every line parsed: invalid JSON anywhere is found now
        return columns, rows[:_HEAD_ROWS], what
    columns, rows, what = _rows(spec, where)
    return columns, list(itertools.islice(rows, _HEAD_ROWS)), what


def _columns(rows: Any) -> list[str]:
    """The union of the rows' keys, in first-seen order (JSON rows may omit empty fields)."""
    out: dict[str, None] = {}
    for r in rows:
        out.update(dict.fromkeys(r))
    return list(out)


def _first_line(e: BaseException) -> str:
    lines = [s for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


# ---------------------------------------------------------------------------------------------
# The mixture
# ---------------------------------------------------------------------------------------------
SFT_COUNT_KEYS = {
    "rows": "rows read",
    "empty": "no usable text: a blank or missing instruction / response, or no assistant turn",
    "failed_translation": "kunishou/hh-rlhf-49k-ja rows with ng_translation == '1'",
    "malformed": "rows that are not a conversation (non-string fields, bad roles or turn order)",
    "duplicates": "an example already kept (this or an earlier dataset; same turns after whitespace strip)",
    "capped": "usable examples past max_examples",
    "eval": "held-out examples (eval_fraction)",
    "subsampled": "training examples left out by weight < 1",
    "train_unique": "distinct training examples",
    "repeated": "extra copies added by weight > 1",
    "train": "training examples (train_unique + repeated)",
}


@dataclass
class SftData:
    """Training and held-out examples, and per-dataset counts (keys: ``SFT_COUNT_KEYS``)."""

    train: list[dict]
    eval: list[dict]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


def counts_balance(c: dict[str, int]) -> bool:
    """The identity every dataset's counts satisfy: no row vanishes uncounted."""
    dropped = c["empty"] + c["failed_translation"] + c["malformed"] + c["duplicates"] + c["capped"]
    return (c["rows"] == dropped + c["eval"] + c["subsampled"] + c["train_unique"]
            and c["train"] == c["train_unique"] + c["repeated"])


def _key(messages: list[dict]) -> tuple:
    """Duplicate identity: the turns' roles, contents and inputs, whitespace-stripped."""
    return tuple((t["role"], t["content"].strip(), t.get("input", "").strip()) for t in messages)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _eval_size(n: int, fraction: float) -> int:
    """Held-out examples of n: round(fraction × n), at least 1 when fraction > 0 and n ≥ 2, never all n."""
    if fraction <= 0 or n < 2:
        return 0
    return min(max(_round_half_up(fraction * n), 1), n - 1)


def _weighted(examples: list[dict], weight: float, rng: random.Random) -> tuple[list[dict], int, int]:
    """(train, unique used, extra copies): round(weight × n) examples; whole copies plus a seeded sample."""
    n = len(examples)
    target = _round_half_up(weight * n)
    copies, rest = divmod(target, n)
    picked = sorted(rng.sample(range(n), rest))
    out = examples * copies + [examples[j] for j in picked]
    unique = n if copies else rest
    return out, unique, target - unique


def load_sft_data(specs: list[dict], eval_fraction: float = 0.0, seed: int = 0) -> SftData:
    """All instruction sets as conversations: deduplicated, capped, split, weighted; every row counted.

    Per dataset, in spec order: rows are converted (dropped rows counted by reason); an example whose turns
    match one already kept (any dataset) is a duplicate; the first ``max_examples`` kept are used (the rest
    ``capped``); ``eval_fraction`` of them (seeded, per dataset) are held out — before weighting, so no copy
    of an eval example is trained on; the rest are weighted (``weight``: round(weight × n), < 1 a seeded
    sample, > 1 whole copies plus a seeded sample). Deterministic for a seed: identical on every rank.
    A dataset with no training example left raises one ``XltError`` line naming it and its counts.
    """
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) \
            or not 0 <= eval_fraction < 1:
        raise XltError(f"eval_fraction={eval_fraction!r} must be in [0, 1)")
    check_sft_specs(specs, hub=False)
    seen: set[tuple] = set()
    train: list[dict] = []
    held: list[dict] = []
    counts: dict[str, dict[str, int]] = {}
    for i, spec in enumerate(specs):
        where, name = f"sft_datasets[{i}]", spec_name(spec)
        c = dict.fromkeys(SFT_COUNT_KEYS, 0)
        columns, rows, what = _rows(spec, where)
        layout = match_layout(spec.get("adapter", "auto"), columns, where, what)
        cap = spec.get("max_examples")
        kept: list[dict] = []
        first_drop = ""
        for loc, row in rows:
            c["rows"] += 1
            result = layout.convert(row)
            if isinstance(result, Drop):
                c[result.reason] += 1
                first_drop = first_drop or f"{loc}: {result.reason}{' (' + result.detail + ')' if result.detail else ''}"
                continue
            key = _key(result)
            if key in seen:
                c["duplicates"] += 1
            elif cap is not None and len(kept) >= cap:
                c["capped"] += 1
            else:
                seen.add(key)
                kept.append({"messages": result, "source": name})
        rng = random.Random(f"xlt-sft:{seed}:{name}")  # str seeds hash with SHA-512: stable across runs
        n_eval = _eval_size(len(kept), eval_fraction)
        eval_idx = set(rng.sample(range(len(kept)), n_eval))
        held_here = [ex for j, ex in enumerate(kept) if j in eval_idx]
        base = [ex for j, ex in enumerate(kept) if j not in eval_idx]
        weight = spec.get("weight")
        if base and weight is not None and weight != 1:
            base_w, unique, repeated = _weighted(base, float(weight), rng)
        else:
            base_w, unique, repeated = base, len(base), 0
        c.update(eval=len(held_here), subsampled=len(base) - unique, train_unique=unique, repeated=repeated,
                 train=len(base_w))
        if not base_w:
            detail = ", ".join(f"{k}={v}" for k, v in c.items() if v and k != "train")
            why = f"; first dropped: {first_drop}" if first_drop else ""
            raise XltError(f"{where}: {name}: no training examples left ({detail or 'no rows'}){why}")
        assert counts_balance(c), c
        counts[name] = c
        train.extend(base_w)
        held.extend(held_here)
    return SftData(train=train, eval=held, counts=counts)
