"""Continued pretraining on transformers' Trainer.

Phases (each named in the log): inputs → tokenizer → model → data → train → save → report.
Every input check runs in the first phase, before any model is loaded.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

from xlt.config import (
    CptArguments,
    DataArguments,
    ModelArguments,
    TokenizerArguments,
    XltError,
    validate_data_args,
)
from xlt.data.sources import Source, heldout_texts, load_sources
from xlt.models import check_model_spec, load_model, load_tokenizer, resolve_model
from xlt.train.checkpoint import (
    STATE_FILE,
    atomic_save_dir,
    atomic_write_json,
    atomic_write_jsonl,
    claim_output_dir,
    fingerprint,
    last_complete_checkpoint,
    update_report,
)

# TrainingArguments that change what a run computes (the rest — logging, saving, paths — may differ on resume).
_RUN_KEYS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta1",
             "adam_beta2", "adam_epsilon", "max_grad_norm", "per_device_train_batch_size",
             "gradient_accumulation_steps", "max_steps", "seed", "bf16", "fp16", "optim")


@dataclass
class StepPlan:
    """The tokens-per-step arithmetic, spelled out."""

    seq_len: int
    per_device_batch: int
    grad_accum: int
    world_size: int
    max_steps: int

    @property
    def rows_per_step(self) -> int:
        return self.per_device_batch * self.grad_accum * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.rows_per_step * self.seq_len

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.max_steps

    def describe(self) -> str:
        return (f"tokens/step = seq_len {self.seq_len} x batch {self.per_device_batch} x grad_accum "
                f"{self.grad_accum} x processes {self.world_size} = {self.tokens_per_step:,}; "
                f"{self.max_steps:,} steps = {self.total_tokens:,} tokens")


def plan_steps(data_args: DataArguments, cpt_args: CptArguments, training_args: Any, world_size: int = 1) -> StepPlan:
    plan = StepPlan(data_args.seq_len, training_args.per_device_train_batch_size,
                    training_args.gradient_accumulation_steps, world_size, max(0, training_args.max_steps))
    if cpt_args.train_tokens:
        plan.max_steps = math.ceil(cpt_args.train_tokens / plan.tokens_per_step)
    if plan.max_steps <= 0:
        raise XltError("set train_tokens or max_steps: a streamed pretraining run needs a length")
    return plan


def _log(msg: str) -> None:
    print(f"[xlt cpt] {msg}", flush=True)


def check_cpt_inputs(model_args: ModelArguments, tok_args: TokenizerArguments, data_args: DataArguments,
                     cpt_args: CptArguments, training_args: Any) -> tuple[list[Source], Optional[list[Source]], StepPlan]:
    """Every check that needs no model: keys, files, text fields, schedule, model spec, run length."""
    from xlt.data.schedule import validate_schedule
    from xlt.data.stream import check_languages

    validate_data_args(data_args)
    validate_schedule(data_args)
    sources = load_sources(data_args.sources, "sources")
    eval_sources = load_sources(data_args.eval_sources, "eval_sources") if data_args.eval_sources else None
    check_languages(data_args, sources)  # the schedule's whole range (piecewise points too), not just start/end
    check_model_spec(model_args.model)
    if tok_args.tokenizer_mode not in ("none", "extend", "swap"):
        raise XltError(f"tokenizer_mode={tok_args.tokenizer_mode!r}: expected none, extend or swap")
    if tok_args.tokenizer_mode != "none":
        from xlt.tokenizer.extend import check_tokenizer_inputs

        if tok_args.tokenizer_corpus:
            load_sources(tok_args.tokenizer_corpus, "tokenizer_corpus")
        check_tokenizer_inputs(model_args.model, tok_args)
    plan = plan_steps(data_args, cpt_args, training_args, int(os.environ.get("WORLD_SIZE", "1")))
    return sources, eval_sources, plan


def tokenizer_corpus(tok_args: TokenizerArguments, sources: list[Source]) -> list[str]:
    """Japanese training text for new merges, capped at ``tokenizer_max_chars`` (held-out docs excluded)."""
    corpus_sources = load_sources(tok_args.tokenizer_corpus, "tokenizer_corpus") if tok_args.tokenizer_corpus else \
        [s for s in sources if s.lang == "ja"]
    texts, chars = [], 0
    for s in corpus_sources:
        docs = s.split_holdout()[0] if not s.streaming else s.iter_stream()
        for d in docs:
            texts.append(d)
            chars += len(d)
            if chars >= tok_args.tokenizer_max_chars:
                return texts
    return texts


def prepare_model_dir(model_args: ModelArguments, tok_args: TokenizerArguments, sources: list[Source],
                      eval_texts: dict[str, list[str]], output_dir: str) -> tuple[str, Optional[dict]]:
    """The model to train from: the base, or the extended/swapped one in ``OUTPUT_DIR/tokenizer``.

    The extension is cached there, keyed by its settings: a second run with the same settings
    reuses it, a run with other settings rebuilds it.
    """
    base = resolve_model(model_args.model)
    if tok_args.tokenizer_mode == "none":
        return base, None
    from xlt.tokenizer.extend import build_tokenizer_stage

    tok_dir = os.path.join(output_dir, "tokenizer")
    key = fingerprint(tok_args, {"model": model_args.model, "sources": [s.name for s in sources]})
    key_file = os.path.join(tok_dir, "xlt_tokenizer_key.json")
    if os.path.isfile(key_file) and os.path.isfile(os.path.join(tok_dir, "tokenizer_report.json")):
        with open(key_file, encoding="utf-8") as f:
            if json.load(f) == key:
                _log(f"tokenizer: reusing {tok_dir} (same settings)")
                with open(os.path.join(tok_dir, "tokenizer_report.json"), encoding="utf-8") as f:
                    return tok_dir, json.load(f)
    texts = tokenizer_corpus(tok_args, sources)
    _log(f"tokenizer: {tok_args.tokenizer_mode} with {tok_args.new_tokens} new tokens from "
         f"{sum(map(len, texts)):,} characters")

    def build(tmp: str) -> None:
        build_tokenizer_stage(model_args.model, tok_args, texts, eval_texts, tmp,
                              trust_remote_code=model_args.trust_remote_code)
        atomic_write_json(os.path.join(tmp, "xlt_tokenizer_key.json"), key)

    atomic_save_dir(build, tok_dir)
    with open(os.path.join(tok_dir, "tokenizer_report.json"), encoding="utf-8") as f:
        return tok_dir, json.load(f)


def run_tokenizer_stage(model_args: ModelArguments, tok_args: TokenizerArguments, data_args: DataArguments,
                        cpt_args: CptArguments, out: Any) -> dict:
    """The tokenizer stage alone (``make extend-tokenizer``), cached where continued pretraining looks."""
    if tok_args.tokenizer_mode == "none":
        raise XltError("tokenizer_mode is 'none': nothing to extend (set extend or swap)")
    sources = load_sources(data_args.sources, "sources")
    eval_sources = load_sources(data_args.eval_sources, "eval_sources") if data_args.eval_sources else None
    check_model_spec(model_args.model)
    from xlt.tokenizer.extend import check_tokenizer_inputs

    check_tokenizer_inputs(model_args.model, tok_args)
    claim_output_dir(out.output_dir, "tokenizer", fingerprint(model_args, tok_args))
    eval_texts = heldout_texts(sources, eval_sources, cpt_args.eval_max_docs)
    _, report = prepare_model_dir(model_args, tok_args, sources, eval_texts, out.output_dir)
    return report


def _make_trainer_class():
    from transformers import Trainer

    from xlt.train.skip_step import SkipStepCallback, SkipStepOptimizer, check_backend

    class XltTrainer(Trainer):
        """Trainer plus: the skip-step guard on the optimizer step, and token accounting in every log.

        The guard (``xlt_guard``, a ``SkipStepGuard``) wraps the raw optimizer before accelerate does, is fed
        each micro-batch loss (a device tensor, no sync) and the grad norm the clipper reduced, and judges
        each step on values all-reduced over the processes (xlt/train/skip_step.py).
        """

        xlt_guard = None
        xlt_stream = None
        xlt_rows_per_step = 1

        def _guard_on(self) -> bool:
            return self.xlt_guard is not None and self.xlt_guard.enabled

        def train(self, *args: Any, **kwargs: Any):
            check_backend(self, self.xlt_guard)  # DeepSpeed steps and clips itself: refuse before any work
            if self._guard_on() and not any(isinstance(c, SkipStepCallback) for c in self.callback_handler.callbacks):
                self.add_callback(SkipStepCallback(self.xlt_guard))
            return super().train(*args, **kwargs)

        def create_optimizer(self, *args: Any, **kwargs: Any):
            opt = super().create_optimizer(*args, **kwargs)
            if self._guard_on() and not isinstance(opt, SkipStepOptimizer):
                self.optimizer = opt = SkipStepOptimizer(opt, self.xlt_guard)
            return opt

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self._guard_on():
                # The Trainer divides each micro-batch loss by the accumulation steps; undo it so the guard
                # averages micro-batch losses. A tensor op: nothing is read back until the optimizer step.
                self.xlt_guard.record_loss(loss * self.current_gradient_accumulation_steps, self.state.global_step + 1)
            return loss

        def _get_grad_norm(self, model, grad_norm=None):
            # transformers 5.24 computes the global (cross-rank) norm here on every optimizer step, clipping or
            # not (max_grad_norm 0: clip_grad_norm_ with max inf). Without it the guard checks the gradients itself.
            grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
            if self._guard_on():
                self.xlt_guard.record_grad_norm(grad_norm, self.state.global_step + 1)
            return grad_norm

        def log(self, logs: dict, start_time: Optional[float] = None) -> None:
            # Only the main process iterates the stream (accelerate dispatches batches from it).
            if self.xlt_stream is not None and "loss" in logs and self.is_world_process_zero():
                acc = self.xlt_stream.accounting_at(self.state.global_step * self.xlt_rows_per_step)
                trained = acc.get("tokens_trained", {})
                total = sum(trained.values()) or 1
                logs["tokens_trained"] = total
                for lang, n in trained.items():
                    logs[f"tokens_trained_{lang}"] = n
                logs["ja_share_cum"] = round(trained.get("ja", 0) / total, 4)
                if self.xlt_guard is not None:
                    logs["skipped_steps"] = self.xlt_guard.skipped
            super().log(logs, start_time)

    return XltTrainer


def run_cpt(model_args: ModelArguments, tok_args: TokenizerArguments, data_args: DataArguments,
            cpt_args: CptArguments, training_args: Any) -> dict:
    """Run (or resume) continued pretraining; returns the report section it wrote."""
    t0 = time.time()
    output_dir = training_args.output_dir
    # -- phase: inputs (no model loaded yet) ---------------------------------------------------
    sources, eval_sources, plan = check_cpt_inputs(model_args, tok_args, data_args, cpt_args, training_args)
    training_args.max_steps = plan.max_steps
    settings = fingerprint(model_args, tok_args, data_args, cpt_args,
                           {k: getattr(training_args, k, None) for k in _RUN_KEYS}, exclude=("resume", "eval_max_docs"))
    _log(plan.describe())
    eval_texts = heldout_texts(sources, eval_sources, cpt_args.eval_max_docs)
    # The main process claims the directory, writes the held-out split and builds the tokenizer first; the
    # others then find all three in place (the tokenizer by its cache key) instead of racing to write them.
    with training_args.main_process_first(local=False, desc="xlt run directory"):
        claim_output_dir(output_dir, "cpt", settings)
        for lang, docs in eval_texts.items():
            path = os.path.join(output_dir, "heldout", f"{lang}.jsonl")
            if not os.path.isfile(path):
                atomic_write_jsonl(path, [{"text": d} for d in docs])

        # -- phase: tokenizer -------------------------------------------------------------------
        model_dir, tok_report = prepare_model_dir(model_args, tok_args, sources, eval_texts, output_dir)

    # -- phase: model ---------------------------------------------------------------------------
    tokenizer = load_tokenizer(model_dir, trust_remote_code=model_args.trust_remote_code)
    model = load_model(model_dir, model_args.torch_dtype, model_args.attn_implementation,
                       model_args.trust_remote_code)
    model.config.use_cache = False  # a cache disables the packed (per-document) attention mask

    # -- phase: data ----------------------------------------------------------------------------
    from xlt.data.stream import build_pretrain_stream

    stream = build_pretrain_stream(data_args, tokenizer, plan.total_tokens, plan.rows_per_step)
    # Checkpoints here can only be this run's: claim_output_dir refuses a directory holding another run.
    resume_from = last_complete_checkpoint(output_dir) if cpt_args.resume else None
    from xlt.train.callbacks import XltStateCallback
    from xlt.train.skip_step import SkipStepGuard

    guard = SkipStepGuard.from_args(cpt_args)
    if resume_from:
        with open(os.path.join(resume_from, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
        stream.load_state_dict(state["stream"])
        if state.get("guard"):
            guard.load_state_dict(state["guard"])
        _log(f"resuming from {resume_from} (step {state['global_step']}, no batch replay)")
        if state["global_step"] >= plan.max_steps and os.path.isfile(os.path.join(output_dir, "cpt", "config.json")):
            _log(f"the run is complete ({plan.max_steps} steps); nothing to do")
            with open(os.path.join(output_dir, "report.json"), encoding="utf-8") as f:
                report = json.load(f)
            return {k: report[k] for k in ("tokens_trained", "cpt", "tokenizer") if k in report}
    # The stream restores its own position, so the Trainer must not skip batches on resume.
    training_args.ignore_data_skip = True

    # -- phase: train ---------------------------------------------------------------------------
    from transformers import default_data_collator

    trainer_cls = _make_trainer_class()
    trainer = trainer_cls(model=model, args=training_args, train_dataset=stream, data_collator=default_data_collator,
                          processing_class=tokenizer, callbacks=[XltStateCallback(stream, plan.rows_per_step, guard)])
    trainer.xlt_guard, trainer.xlt_stream, trainer.xlt_rows_per_step = guard, stream, plan.rows_per_step
    result = trainer.train(resume_from_checkpoint=resume_from)
    if guard.stop_requested:  # the guard saved a checkpoint and stopped the run: end with one line (exit 2)
        trainer.accelerator.wait_for_everyone()
        raise XltError(guard.stop_message(output_dir, trainer.state.global_step))

    # -- phase: save ----------------------------------------------------------------------------
    final_dir = os.path.join(output_dir, "cpt")
    if trainer.is_world_process_zero():
        def save(tmp: str) -> None:
            trainer.model.config.use_cache = True
            trainer.model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        atomic_save_dir(save, final_dir)
    trainer.accelerator.wait_for_everyone()

    # -- phase: report --------------------------------------------------------------------------
    rows = trainer.state.global_step * plan.rows_per_step
    accounting = stream.accounting_at(rows) if trainer.is_world_process_zero() else {}
    seconds = time.time() - t0
    section = {
        "tokens_trained": accounting.get("tokens_trained", {}),
        "cpt": {
            "model": model_args.model,
            "model_dir": final_dir,
            "steps": trainer.state.global_step,
            "tokens_per_step": plan.tokens_per_step,
            "train_loss": round(float(result.training_loss), 4),
            "skipped_steps": guard.skipped,
            "seconds": round(seconds, 1),
            "train_tokens_per_second": round(plan.tokens_per_step * trainer.state.global_step / max(seconds, 1e-9), 1),
            "accounting": accounting,
            "cleaning": getattr(stream, "cleaning_report", {}),
        },
    }
    if tok_report is not None:
        section["tokenizer"] = {
            "ja_chars_per_token": tok_report["chars_per_token"]["ja"],
            "en_chars_per_token": tok_report["chars_per_token"]["en"],
            "new_tokens": tok_report["new_tokens"],
            "unreachable": tok_report.get("unreachable"),
        }
    if trainer.is_world_process_zero():
        update_report(output_dir, section)
    _log(f"done: {trainer.state.global_step} steps in {seconds:.0f}s; model in {final_dir}")
    return section
