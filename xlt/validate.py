"""Recipe value checks that run before any model or tokenizer loads.

Four kinds, each raising one ``XltError`` line that names the key (or the file and line):

* types: every recipe value against its dataclass annotation (``check_values``). TrlParser passes YAML
  values to argparse as *defaults*, which argparse never type-converts unless they are strings, so
  ``learning_rate: [1, 2]`` would otherwise reach the Trainer. Run on the raw YAML mapping before
  TrainingArguments is built (its ``__post_init__`` would see the bad value first), and on the
  parsed dataclasses afterwards (command-line overrides).
* ranges: one small rule per numeric key (``RULES``), ours and the TrainingArguments / SFTConfig keys.
* data files: the head of a local jsonl / txt file is UTF-8 text, not binary (``read_text_head``);
  lines read later are decoded one by one so an error names the line (``decode_line``).
* the output directory can be created and written (``check_output_dir``).
"""

from __future__ import annotations

import codecs
import dataclasses
import enum
import os
import tempfile
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional

from xlt.errors import XltError

# ---------------------------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------------------------
# Strings argparse's ``string_to_bool`` (HfArgumentParser) accepts for a bool field.
_BOOL_STRINGS = {"yes", "no", "true", "false", "t", "f", "y", "n", "1", "0"}


def _parses(conv: Callable[[str], Any], s: str) -> bool:
    try:
        conv(s)
    except ValueError:
        return False
    return True


def _accepts(value: Any, ann: Any) -> bool:
    """Whether ``value`` fits annotation ``ann``; unknown annotations accept anything (no false alarms).

    A string is accepted for int / float / bool when argparse would convert it (TrlParser hands YAML
    values to argparse as defaults, and argparse converts string defaults), e.g. YAML's ``1e-4``,
    which PyYAML reads as a string.
    """
    if ann is Any or ann is None:
        return True
    if ann is type(None):
        return value is None
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, a) for a in typing.get_args(ann))
    if origin is typing.Literal:
        return value in typing.get_args(ann)
    if origin in (list, tuple, Sequence, Iterable):
        args = typing.get_args(ann)
        return isinstance(value, list) and (not args or all(_accepts(v, args[0]) for v in value))
    if origin in (dict, Mapping) or ann in (dict, Mapping):
        return isinstance(value, dict)
    if ann is list:
        return isinstance(value, list)
    if ann is bool:
        return (isinstance(value, bool) or (type(value) is int and value in (0, 1))
                or (isinstance(value, str) and value.lower() in _BOOL_STRINGS))
    if ann is int:
        return (type(value) is int) or (isinstance(value, str) and _parses(int, value))
    if ann is float:
        return type(value) in (int, float) or (isinstance(value, str) and _parses(float, value))
    if ann is str:
        return isinstance(value, str)
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return isinstance(value, (str, ann))
    return True  # another class (e.g. a config object): not ours to judge


def _describe(ann: Any) -> str:
    """What an annotation asks for, in words: 'an integer', 'a list of mappings or null'."""
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(ann)
        parts = list(dict.fromkeys(_describe(a) for a in args if a is not type(None)))  # null goes unsaid
        return " or ".join(parts) or "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    if origin in (list, tuple, Sequence, Iterable) or ann is list:
        args = typing.get_args(ann)
        return "a list" if not args else "a list of " + {
            "a mapping": "mappings", "a string": "strings", "an integer": "integers", "a number": "numbers",
        }.get(_describe(args[0]), "items")
    if origin in (dict, Mapping) or (isinstance(ann, type) and issubclass(ann, enum.Enum)):
        return "a mapping" if origin else "a string"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
            type(None): "null"}.get(ann, getattr(ann, "__name__", str(ann)))


def _kind(value: Any) -> str:
    """The YAML kind of a value, for messages."""
    for t, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                    (list, "a list"), (dict, "a mapping")):
        if isinstance(value, t):
            return name
    return "null" if value is None else type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
    s = repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def type_error(key: str, value: Any, ann: Any) -> Optional[str]:
    """The one-line message when ``value`` does not fit ``ann``, else None."""
    if _accepts(value, ann):
        return None
    got = "null" if value is None else f"{_kind(value)} {_short(value)}"
    return f"{key}: expected {_describe(ann)}, got {got}"


def field_types(cls: type) -> dict[str, Any]:
    """Annotation of every init field of a dataclass (string annotations resolved; unresolvable ones: Any)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - a forward reference we cannot resolve: fall back per field
        hints = {}
    out = {}
    for f in dataclasses.fields(cls):
        if f.init:
            ann = hints.get(f.name, f.type)
            out[f.name] = Any if isinstance(ann, str) else ann
    return out


# ---------------------------------------------------------------------------------------------
# Ranges: one rule per numeric key
# ---------------------------------------------------------------------------------------------
Rule = tuple[Callable[[float], bool], str]
POSITIVE: Rule = (lambda v: v > 0, "must be > 0")
NON_NEGATIVE: Rule = (lambda v: v >= 0, "must be >= 0")
AT_LEAST_1: Rule = (lambda v: v >= 1, "must be >= 1")
AT_LEAST_2: Rule = (lambda v: v >= 2, "must be >= 2")
UNIT: Rule = (lambda v: 0 <= v <= 1, "is outside [0, 1]")
UNIT_OPEN_RIGHT: Rule = (lambda v: 0 <= v < 1, "must be in [0, 1)")
UNIT_OPEN_LEFT: Rule = (lambda v: 0 < v <= 1, "must be in (0, 1]")
STEPS_OR_UNSET: Rule = (lambda v: v == -1 or v > 0, "must be > 0 (or -1: unset)")
SEED: Rule = (lambda v: 0 <= v < 2**32, "must be in [0, 2**32)")  # numpy's seed range (transformers' set_seed)
MULTIPLE_OF_8: Rule = (lambda v: v > 0 and v % 8 == 0, "must be a positive multiple of 8")
OFF_OR_ABOVE_1: Rule = (lambda v: v == 0 or v > 1, "must be 0 (off) or > 1")

RULES: dict[str, Rule] = {
    # transformers TrainingArguments / trl SFTConfig keys the recipes use
    "learning_rate": POSITIVE,
    "per_device_train_batch_size": POSITIVE,
    "per_device_eval_batch_size": POSITIVE,
    "gradient_accumulation_steps": POSITIVE,
    "max_steps": STEPS_OR_UNSET,
    "num_train_epochs": POSITIVE,
    "save_steps": POSITIVE,        # a float < 1 is a fraction of the run (transformers)
    "logging_steps": POSITIVE,
    "eval_steps": POSITIVE,
    "warmup_steps": NON_NEGATIVE,  # a float < 1 is a fraction of the run (transformers)
    "weight_decay": NON_NEGATIVE,
    "adam_beta1": UNIT_OPEN_RIGHT,
    "adam_beta2": UNIT_OPEN_RIGHT,
    "adam_epsilon": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,  # 0 disables clipping
    "save_total_limit": NON_NEGATIVE,
    "seed": SEED,
    "data_seed": SEED,
    "dataloader_num_workers": NON_NEGATIVE,
    "max_length": POSITIVE,
    "dataset_num_proc": POSITIVE,
    # TokenizerArguments
    "new_tokens": NON_NEGATIVE,     # > 0 when tokenizer_mode is extend/swap (checked with the mode)
    "tokenizer_max_chars": POSITIVE,
    "min_frequency": AT_LEAST_1,
    "max_token_chars": AT_LEAST_2,
    "pad_vocab_multiple": AT_LEAST_1,
    # DataArguments
    "seq_len": MULTIPLE_OF_8,
    "ja_ratio_start": UNIT,
    "ja_ratio_end": UNIT,
    "ja_ramp_fraction": UNIT_OPEN_LEFT,
    "slw_min_len": MULTIPLE_OF_8,   # and <= seq_len (config.validate_data_args)
    "slw_fraction": UNIT_OPEN_LEFT,
    "max_epochs_warning": POSITIVE,
    "clean_min_chars": NON_NEGATIVE,
    "clean_min_ja_share": UNIT,
    "stream_seed": SEED,
    # CptArguments
    "train_tokens": POSITIVE,
    "loss_by_language_steps": NON_NEGATIVE,  # 0 disables the loss-by-language measurement
    "spike_factor": OFF_OR_ABOVE_1,  # a factor <= 1 would skip nearly every step
    "eval_max_docs": POSITIVE,
    "train_layers_first": NON_NEGATIVE,
    "train_layers_last": NON_NEGATIVE,
    "partial_training_fraction": UNIT,
    # EvalArguments
    "eval_max_length": POSITIVE,
    "max_new_tokens": POSITIVE,
    "speed_max_chars": NON_NEGATIVE,  # 0 skips the speed measurement
    "mc_max_n": POSITIVE,
    "mt_bench_max_questions": POSITIVE,
    "mt_bench_max_new_tokens": POSITIVE,
    "mt_bench_judge_max_tokens": POSITIVE,
}


# Keys whose value is one of a fixed set.
CHOICES: dict[str, tuple[str, ...]] = {
    "ja_schedule": ("constant", "linear", "step", "cosine", "piecewise"),
    "slw_schedule": ("linear", "root"),
    "data_source": ("stream", "shards"),
}


def choice_error(key: str, value: Any, choices: Mapping[str, tuple[str, ...]] = CHOICES) -> Optional[str]:
    """``"ja_schedule='exp': expected constant, linear, step, cosine or piecewise"`` when a value is not among its
    key's choices, else None."""
    options = choices.get(key)
    if options is None or value in options:
        return None
    return f"{key}={value!r}: expected {', '.join(options[:-1])} or {options[-1]}"


def parse_points(spec: Any) -> list[tuple[float, float]]:
    """``ja_points``: '0:0.3,0.8:0.3,0.8:0.6,1:0.6' -> [(0, .3), (.8, .3), (.8, .6), (1, .6)], checked.

    Fractions must not decrease; a repeated fraction is a jump (two points, as in the example).
    The first point must be at 0 and the last at 1, so the curve covers the whole run.
    """
    if not spec or not str(spec).strip():
        raise XltError("ja_points: the piecewise schedule needs points 'fraction:ratio,...'")
    points: list[tuple[float, float]] = []
    for item in str(spec).split(","):
        item = item.strip()
        try:
            f_s, r_s = item.split(":")
            f, r = float(f_s), float(r_s)
        except ValueError:
            raise XltError(f"ja_points: {item!r} is not 'fraction:ratio'") from None
        if not 0.0 <= r <= 1.0:
            raise XltError(f"ja_points: ratio {r} at fraction {f} is outside [0, 1]")
        if not 0.0 <= f <= 1.0:
            raise XltError(f"ja_points: fraction {f} is outside [0, 1]")
        if points and f < points[-1][0]:
            raise XltError(f"ja_points: fractions must increase through the run ({f} comes after {points[-1][0]})")
        if len(points) >= 2 and f == points[-1][0] == points[-2][0]:
            raise XltError(f"ja_points: fraction {f} appears more than twice")
        points.append((f, r))
    if points[0][0] != 0.0 or points[-1][0] != 1.0:
        raise XltError(f"ja_points: the first point must be at fraction 0 and the last at 1 (got {spec!r})")
    return points


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def range_error(key: str, value: Any, rules: Mapping[str, Rule] = RULES) -> Optional[str]:
    """``'learning_rate=-0.0001 must be > 0'`` when a number breaks its key's rule, else None.

    Only numbers are judged (None means unset; other kinds are the type check's business).
    """
    rule = rules.get(key)
    if rule is None or not _is_number(value):
        return None
    ok, says = rule
    if value != value or not ok(value):  # NaN fails every rule
        return f"{key}={value} {says}"
    return None


def check_values(values: Mapping[str, Any], annotations: Mapping[str, list[Any]],
                 rules: Mapping[str, Rule] = RULES, where: str = "") -> None:
    """Check each value against every annotation its key has, then against its range rule.

    ``annotations`` maps a key to the annotations it has in the dataclasses that share it; keys it
    lacks are skipped (unknown keys are TrlParser's error). ``where`` prefixes messages (``sources[0]: ``).
    """
    for key, value in values.items():
        for ann in annotations.get(key, ()):
            msg = type_error(key, value, ann)
            if msg:
                raise XltError(where + msg)
        msg = range_error(key, value, rules)
        if msg:
            raise XltError(where + msg)


def recipe_annotations(dataclass_types: Iterable[type]) -> dict[str, list[Any]]:
    """Every field name of the recipe's dataclasses with its annotation(s)."""
    out: dict[str, list[Any]] = {}
    for cls in dataclass_types:
        for name, ann in field_types(cls).items():
            out.setdefault(name, []).append(ann)
    return out


def check_recipe_mapping(data: Mapping[str, Any], dataclass_types: Iterable[type]) -> None:
    """The raw YAML mapping of a recipe, before TrlParser builds (and post-inits) the dataclasses."""
    check_values(data, recipe_annotations(dataclass_types))


def check_parsed(instances: Iterable[Any]) -> None:
    """Parsed dataclasses (YAML merged with command-line overrides), before any model loads.

    xlt's own dataclasses are type-checked field by field; foreign ones (TrainingArguments,
    SFTConfig) only on their ruled numeric keys, since their ``__post_init__`` turns some fields into
    objects their annotations do not describe. Then the output directory is checked.
    """
    for obj in instances:
        if not dataclasses.is_dataclass(obj):
            continue
        own = type(obj).__module__ == "xlt.config"
        anns = field_types(type(obj))
        skip = getattr(obj, "normalised_keys", ())
        values = {k: getattr(obj, k) for k in anns if (own or k in RULES) and k not in skip}
        check_values(values, {k: [anns[k]] for k in values})
        if isinstance(getattr(obj, "output_dir", None), str):
            check_output_dir(obj.output_dir, create=not getattr(obj, "reads_output_dir", False))


# ---------------------------------------------------------------------------------------------
# Source specs (mappings inside `sources`, `eval_sources`, `tokenizer_corpus`, `sft_datasets`)
# ---------------------------------------------------------------------------------------------
def check_spec(where: str, spec: Mapping[str, Any], field_kinds: Mapping[str, Any],
               rules: Mapping[str, Rule] = RULES) -> None:
    """Each given field of a spec has its type (None = absent); numbers are real numbers, not strings.

    Unlike top-level keys, spec fields never pass through argparse, so no string is converted.
    """
    for key, value in spec.items():
        kind = field_kinds.get(key)
        if value is None or kind is None:
            continue
        ok = type(value) in (int, float) if kind is float else (type(value) is int if kind is int
                                                                 else isinstance(value, kind))
        if not ok:
            raise XltError(f"{where}: {key}: expected {_describe(kind)}, got {_kind(value)} {_short(value)}")
        msg = range_error(key, value, rules)
        if msg:
            raise XltError(f"{where}: {msg}")


# ---------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------
HEAD_BYTES = 1 << 20


def _line_of(data: bytes, pos: int) -> int:
    return data.count(b"\n", 0, pos) + 1


def read_text_head(path: str, key: str, limit: int = HEAD_BYTES) -> str:
    """The first ``limit`` bytes of a text file, decoded strictly as UTF-8 (a character cut at the end is dropped).

    Raises an ``XltError`` naming ``key``, the file and the line when the head holds a NUL byte (a
    binary file) or bytes that are not UTF-8. Reads ``limit`` bytes at most: cheap on any file size.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise XltError(f"{key}: cannot read {path} ({e.strerror})") from None
    whole = len(data) <= limit
    data = data[:limit]
    nul = data.find(b"\x00")
    if nul >= 0:
        raise XltError(f"{key}: {path}:{_line_of(data, nul)}: binary data (a NUL byte), not UTF-8 text")
    try:
        return codecs.getincrementaldecoder("utf-8")("strict").decode(data, final=whole)
    except UnicodeDecodeError as e:
        raise XltError(_not_utf8(key, path, _line_of(data, e.start), data[e.start])) from None


def _not_utf8(key: str, path: str, line: int, byte: int) -> str:
    return f"{key}: {path}:{line}: not UTF-8 text (byte 0x{byte:02x}); re-encode the file as UTF-8"


def check_utf8_file(path: str, key: str, chunk: int = HEAD_BYTES) -> None:
    """The whole file is UTF-8 text without NUL bytes; read in chunks (memory stays at ``chunk``).

    For files read only after the model loads (SFT data): a bad byte anywhere is found first.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    line = 1
    try:
        with open(path, "rb") as f:
            while True:
                data = f.read(chunk)
                nul = data.find(b"\x00")
                if nul >= 0:
                    at = line + data.count(b"\n", 0, nul)
                    raise XltError(f"{key}: {path}:{at}: binary data (a NUL byte), not UTF-8 text")
                try:
                    decoder.decode(data, final=not data)
                except UnicodeDecodeError as e:
                    # e.start counts from the bytes held back from the last chunk (a cut character, < 4 bytes)
                    held = len(e.object) - len(data)
                    pos = max(e.start - held, 0)
                    raise XltError(_not_utf8(key, path, line + data.count(b"\n", 0, pos), e.object[e.start])) from None
                if not data:
                    return
                line += data.count(b"\n")
    except OSError as e:
        raise XltError(f"{key}: cannot read {path} ({e.strerror})") from None


def decode_line(raw: bytes, path: str, lineno: int, key: str) -> str:
    """One line of a file read in binary mode, decoded strictly; the error names the file and line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise XltError(_not_utf8(key, path, lineno, raw[e.start])) from None


def decode_text(data: bytes, path: str, key: str) -> str:
    """A whole text file's bytes, decoded strictly; NUL bytes or non-UTF-8 bytes name the file and line."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise XltError(f"{key}: {path}:{_line_of(data, nul)}: binary data (a NUL byte), not UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise XltError(_not_utf8(key, path, _line_of(data, e.start), data[e.start])) from None


# ---------------------------------------------------------------------------------------------
# Output directory
# ---------------------------------------------------------------------------------------------
def check_output_dir(path: str, key: str = "output_dir", create: bool = True) -> None:
    """``path`` is a directory we can write in, or (``create``) one we can create; nothing is left behind.

    Writability is tested by making and removing a temporary directory in ``path`` or in its nearest
    existing ancestor: permission bits alone miss read-only file systems and root. With
    ``create=False`` (a run directory to read, as in evaluate) a missing ``path`` is left to the
    caller's own message.
    """
    if not path:
        raise XltError(f"{key}: empty path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise XltError(f"{key}={path} is a file, not a directory")
    if not create and not os.path.isdir(path):
        return
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise XltError(f"{key}={path} cannot be created: {probe} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".xlt-write-test-"))
    except OSError as e:
        what = "is not writable" if probe == os.path.abspath(path) else f"cannot be created: {probe} is not writable"
        raise XltError(f"{key}={path} {what} ({e.strerror})") from None


# ---------------------------------------------------------------------------------------------
# Command-line numbers: the same rules as recipe keys
# ---------------------------------------------------------------------------------------------
# Numeric options of the ``xlt`` sub-commands whose name is not a recipe key. An option named like a recipe key
# (``--max-length``, ``--new-tokens``, ``--min-frequency``, ...) takes that key's rule from ``RULES``.
CLI_RULES: dict[str, Rule] = {
    "max_docs": AT_LEAST_1,
    "stride": POSITIVE,            # and < max_length (xlt.eval.bpc.resolve_stride)
    "batch_size": AT_LEAST_1,
    "max_n": AT_LEAST_1,
    "limit": AT_LEAST_1,
    "num_fewshot": NON_NEGATIVE,
    "max_questions": AT_LEAST_1,
    "judge_max_tokens": AT_LEAST_1,
    "verdict_retries": NON_NEGATIVE,
    "max_chars": AT_LEAST_1,
    "n": AT_LEAST_1,
    "steps": AT_LEAST_1,
    "distill_steps": NON_NEGATIVE,
    "pad_multiple": AT_LEAST_1,
    "gpus": NON_NEGATIVE,
    "gpu_memory_gb": POSITIVE,
    "processes": AT_LEAST_1,
}


def cli_rule(dest: str) -> Optional[Rule]:
    """The rule of a numeric command-line option: its recipe key's, else its own in ``CLI_RULES``."""
    return RULES.get(dest) or CLI_RULES.get(dest)


def numeric_options(parser: Any) -> list[tuple[Any, Any]]:
    """``(parser, action)`` for every int / float option of ``parser`` and of all its sub-commands."""
    import argparse

    out = []
    for action in parser._actions:  # argparse keeps no public list of a parser's actions
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                out += numeric_options(sub)
        elif action.type in (int, float):
            out.append((parser, action))
    return out


def check_cli_numbers(parser: Any, ns: Any) -> None:
    """Every numeric option given to the chosen (sub-)command against its rule; one ``XltError`` line naming
    the option (``--max-docs=-1 must be >= 1``). Options without a rule are a programming error (tested)."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(ns, action.dest, None) or "")
            if chosen is not None:
                check_cli_numbers(chosen, ns)
        elif action.type in (int, float):
            value = getattr(ns, action.dest, None)
            rule = cli_rule(action.dest)
            if rule is None:
                raise XltError(f"{action.option_strings[0]}: no value rule (xlt.validate.CLI_RULES)")
            msg = range_error(action.dest, value, {action.dest: rule})
            if msg:
                raise XltError(f"{action.option_strings[0]}={value} {msg.split(' ', 1)[1]}")
