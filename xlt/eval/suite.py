"""Evaluate a run directory: held-out bits per character for base / cpt / sft, and one generation."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from xlt.config import EvalArguments, XltError
from xlt.data.sft_format import generation_prompt_ids, stop_token_ids
from xlt.data.sources import read_documents
from xlt.eval.bpc import bits_per_char
from xlt.eval.mc import load_mc_rows, multiple_choice
from xlt.eval.mt_bench_run import stage_options, stage_section
from xlt.eval.speed import generation_speed
from xlt.io import update_report
from xlt.log import logger
from xlt.models import check_model_spec, load_model, load_tokenizer

_log = logger("xlt evaluate")


def heldout_from_run(run_dir: str, max_docs: int) -> dict[str, list[str]]:
    """The held-out texts continued pretraining set aside (``run_dir/heldout/{lang}.jsonl``)."""
    folder = os.path.join(run_dir, "heldout")
    if not os.path.isdir(folder):
        raise XltError(f"{folder} not found: run continued pretraining first (it writes the held-out split)")
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".jsonl"):
            out[name[: -len(".jsonl")]] = read_documents(os.path.join(folder, name), max_docs=max_docs)
    return out


def heldout_file_texts(spec: Optional[str], max_docs: int, taken: set[str]) -> dict[str, list[str]]:
    """``{file stem: documents}`` of the comma-separated ``heldout_files`` (checked before any model loads).

    A missing file, a file with no document, or a stem that repeats (or equals a language of the run's own
    held-out split) is one ``XltError`` line naming it.
    """
    out: dict[str, list[str]] = {}
    for path in [p.strip() for p in (spec or "").split(",") if p.strip()]:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in out or stem in taken:
            raise XltError(f"heldout_files: {path}: the name {stem!r} is already taken (rename the file)")
        docs = [d for d in read_documents(path, max_docs=max_docs, key="heldout_files") if d]
        if not docs:
            raise XltError(f"heldout_files: {path} holds no documents")
        out[stem] = docs
    return out


def generate(model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int,
             stop_ids: Optional[list[int]] = None) -> str:
    """Greedy continuation of ``prompt_ids`` (stops at ``stop_ids``, default the tokenizer's EOS)."""
    import torch

    ids = torch.tensor([prompt_ids], device=model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, repetition_penalty=1.1, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=stop_ids or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def device_name(model: Any) -> str:
    """Where ``model`` runs, as the model card states a speed: the GPU's name, or the CPU and its threads."""
    import torch

    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} thread" + ("s" if torch.get_num_threads() > 1 else "")


@dataclass
class StageResults:
    """What the evaluate stage measured, stage by stage (report.json's sections before they are written)."""

    bpc: dict[str, dict[str, float]]
    detail: dict[str, Any] = field(default_factory=dict)
    mc: dict[str, dict] = field(default_factory=dict)
    speed: dict[str, dict] = field(default_factory=dict)
    sample: Optional[dict] = None


def evaluate_run(args: EvalArguments) -> dict:
    """Bits per character of every stage present in the run; writes the ``bpc`` section of report.json.

    With ``mc_data``, also multiple-choice accuracy of every stage under ``mc``
    (``{"base": {"accuracy", "accuracy_norm", "n", "ci95", "ci95_norm"}, ..., "data": path}``); the file
    is checked before any model loads.
    """
    run_dir = args.output_dir
    check_model_spec(args.model)
    texts = heldout_from_run(run_dir, args.eval_max_docs)
    mc_rows = None
    if args.mc_data:
        if args.mc_max_n is not None and args.mc_max_n < 1:
            raise XltError(f"mc_max_n must be at least 1 (got {args.mc_max_n})")
        mc_rows, _ = load_mc_rows(args.mc_data, args.mc_max_n, key="mc_data")
    texts.update(heldout_file_texts(args.heldout_files, args.eval_max_docs, set(texts)))
    mt_bench = stage_options(args)  # checked now, run after the stages' models are freed
    stages = {"base": args.model}
    for stage in ("cpt", "sft"):
        if os.path.isdir(os.path.join(run_dir, stage)):
            stages[stage] = os.path.join(run_dir, stage)
    results = StageResults(bpc={lang: {} for lang in texts})
    for stage, spec in stages.items():
        evaluate_stage(stage, spec, args, texts, mc_rows, results)
    section = eval_section(args, texts, results)
    if mt_bench:
        section["mt_bench"] = stage_section(mt_bench)
    started = os.environ.get("XLT_DEMO_START")
    if started:
        section["wall_seconds"] = round(time.time() - float(started), 1)
    return update_report(run_dir, section)


def evaluate_stage(stage: str, spec: str, args: EvalArguments, texts: dict[str, list[str]],
                   mc_rows: Optional[list], results: StageResults) -> None:
    """One stage's model: bits per character on every held-out language, multiple choice (with ``mc_rows``),
    generation speed, and the SFT model's sample answer; the model is freed afterwards."""
    t = time.time()
    tokenizer = load_tokenizer(spec, trust_remote_code=args.trust_remote_code)
    model = load_model(spec, trust_remote_code=args.trust_remote_code)
    for lang, docs in texts.items():
        r = bits_per_char(model, tokenizer, docs, max_length=args.eval_max_length)
        results.bpc[lang][stage] = round(r["bits_per_char"], 4)
        results.detail[f"{stage}/{lang}"] = {"chars": r["chars"], "tokens": r["tokens"],
                                             "chars_per_token": round(r["chars"] / max(r["tokens"], 1), 4)}
    if mc_rows is not None:
        r = multiple_choice(model, tokenizer, mc_rows)
        results.mc[stage] = {k: r[k] for k in ("accuracy", "accuracy_norm", "n", "ci95", "ci95_norm")}
        _log(f"{stage}: multiple choice {r['accuracy']:.4f} (norm {r['accuracy_norm']:.4f}) over {r['n']}")
    if args.speed_max_chars > 0:
        r = generation_speed(model, tokenizer, max_chars=args.speed_max_chars)
        results.speed[stage] = {**{k: r[k] for k in ("chars_per_second", "chars_per_token", "tokens_per_second",
                                                     "chars", "tokens", "seconds")}, "device": device_name(model)}
        _log(f"{stage}: {r['chars_per_second']:.1f} chars/s, {r['chars_per_token']:.3f} chars/token")
    if stage == "sft":
        ids = generation_prompt_ids([{"role": "user", "content": args.generate_prompt}], args.prompt_format, tokenizer)
        results.sample = {"prompt": args.generate_prompt,
                          "output": generate(model, tokenizer, ids, args.max_new_tokens,
                                             stop_token_ids(args.prompt_format, tokenizer))}
    _log(f"{stage}: " + ", ".join(f"{lang} {results.bpc[lang][stage]:.4f} bpc" for lang in texts) +
         f" ({time.time() - t:.0f}s)")
    del model


def eval_section(args: EvalArguments, texts: dict[str, list[str]], results: StageResults) -> dict[str, Any]:
    """report.json's ``bpc`` and ``eval`` sections, with ``mc``, ``speed`` and ``generation`` where measured."""
    files = [p.strip() for p in (args.heldout_files or "").split(",") if p.strip()]
    section: dict[str, Any] = {"bpc": results.bpc,
                               "eval": {"heldout_docs": {k: len(v) for k, v in texts.items()},
                                        "heldout_chars": {k: sum(map(len, v)) for k, v in texts.items()},
                                        "detail": results.detail, "heldout_files": files}}
    if results.mc:
        section["mc"] = {**results.mc, "data": args.mc_data}
    speed = results.speed
    if speed:
        section["speed"] = speed
        if "base" in speed and "cpt" in speed:
            section["eval"]["speedup_cpt_over_base"] = round(
                speed["cpt"]["chars_per_second"] / max(speed["base"]["chars_per_second"], 1e-9), 3)
    if results.sample:
        section["generation"] = results.sample
    return section


def bpc_json(model_spec: str, data: str | Sequence[str], text_field: str = "text", max_docs: int | None = None,
             max_length: int = 1024, trust_remote_code: bool = False, stride: int | None = None,
             batch_size: int = 8) -> dict:
    """``xlt evaluate bpc``: bits per character / byte of a model on one file or several.

    One file: ``{"bits_per_char", "bits_per_byte", "chars", "tokens"}``. Several: the same keys for
    all files together plus ``"files": {path: {...}}``. Every file and ``stride`` are checked before
    the model loads.
    """
    from xlt.eval.bpc import resolve_stride

    paths = [data] if isinstance(data, str) else list(data)
    try:
        stride = resolve_stride(max_length, stride)
    except ValueError as e:
        raise XltError(f"--stride/--max-length: {e}") from None
    check_model_spec(model_spec)
    docs_by_file = {}
    for path in paths:
        docs = [d for d in read_documents(path, text_field=text_field, max_docs=max_docs, key="--data") if d]
        if not docs:
            raise XltError(f"--data: {path} holds no documents")
        docs_by_file[path] = docs
    tokenizer = load_tokenizer(model_spec, trust_remote_code=trust_remote_code)
    model = load_model(model_spec, trust_remote_code=trust_remote_code)
    keys = ("bits_per_char", "bits_per_byte", "chars", "tokens")
    files = {path: bits_per_char(model, tokenizer, docs, max_length=max_length, batch_size=batch_size, stride=stride)
             for path, docs in docs_by_file.items()}
    if len(files) == 1:
        (r,) = files.values()
        return {k: r[k] for k in keys}
    bits = sum(r["bits"] for r in files.values())
    chars = sum(r["chars"] for r in files.values())
    n_bytes = sum(r["bytes"] for r in files.values())
    return {"bits_per_char": bits / chars, "bits_per_byte": bits / n_bytes, "chars": chars,
            "tokens": sum(r["tokens"] for r in files.values()),
            "files": {path: {k: r[k] for k in keys} for path, r in files.items()}}


def print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False))
