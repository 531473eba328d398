"""Continued pretraining on transformers' Trainer.

Phases (each named in the log): inputs → tokenizer → model → data → train → save → report.
Every input check runs in the first phase, before any model is loaded.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers import AutoConfig

from xlt.config import (
    CptArguments,
    DataArguments,
    ModelArguments,
    TokenizerArguments,
    XltError,
    validate_data_args,
)
from xlt.data.collate import PackedRowsCollator
from xlt.data.prepare import KEY_FILE, SHARD_BYTES, check_output_dir, prepared_dir_of, settings_key
from xlt.data.shards import build_shard_dataset
from xlt.data.sources import Source, heldout_texts, load_sources
from xlt.data.steps import StepPlan, plan_steps
from xlt.data.stream import build_pretrain_stream, check_languages
from xlt.io import atomic_save_dir, atomic_write_json, atomic_write_jsonl, update_report
from xlt.log import logger
from xlt.models import check_model_spec, load_model, load_tokenizer, resolve_model, resolve_revision
from xlt.tokenizer.extend import build_tokenizer_stage, check_tokenizer_inputs
from xlt.train.callbacks import ProgressPostfix, Throughput, TokenAccounting, XltStateCallback
from xlt.train.checkpoint import (
    STATE_FILE,
    claim_output_dir,
    fingerprint,
    last_complete_checkpoint,
)
from xlt.train.distributed import (
    base_save_dtype,
    check_replicas,
    file_equals_json,
    is_main_process,
    save_final_model,
    wait_for,
)
from xlt.train.fsdp import check_fsdp_launch, setup_fsdp, sharding_check
from xlt.train.kd import Distiller, kd_settings
from xlt.train.lock import run_lock
from xlt.train.lora import LoraSettings, apply_lora, check_lora_targets
from xlt.train.losses import resolve_loss_implementation
from xlt.train.new_rows import new_rows_settings
from xlt.train.partial import PartialTraining, model_layers, partial_settings
from xlt.train.runtime import (
    Launcher,
    apply_throughput_keys,
    check_throughput_keys,
    cuda_capability,
    master_weights_dtype,
    own_activation_checkpointing,
    precision_of,
    resolve_attn_implementation,
    trains_on_cuda,
    warn_pure_bf16,
)
from xlt.train.skip_step import SkipStepGuard
from xlt.train.trainer import CptTrainer

# TrainingArguments that change what a run computes (the rest — logging, saving, paths — may differ on resume).
_RUN_KEYS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta1",
             "adam_beta2", "adam_epsilon", "max_grad_norm", "per_device_train_batch_size",
             "gradient_accumulation_steps", "max_steps", "seed", "bf16", "fp16", "optim")


_log = logger("xlt cpt")


def check_cpt_inputs(model_args: ModelArguments, tok_args: TokenizerArguments, data_args: DataArguments,
                     cpt_args: CptArguments, training_args: Any) -> tuple[list[Source], Optional[list[Source]], StepPlan]:
    """Every check that needs no model: keys, files, text fields, schedule, model spec, run length."""
    validate_data_args(data_args)
    sources = load_sources(data_args.sources, "sources")
    eval_sources = load_sources(data_args.eval_sources, "eval_sources") if data_args.eval_sources else None
    check_languages(data_args, sources)  # the schedule's whole range (piecewise points too), not just start/end
    check_model_spec(model_args.model)
    check_model_runtime(model_args)
    if tok_args.tokenizer_mode not in ("none", "extend", "swap"):
        raise XltError(f"tokenizer_mode={tok_args.tokenizer_mode!r}: expected none, extend or swap")
    if tok_args.tokenizer_mode != "none":
        if tok_args.tokenizer_corpus:
            load_sources(tok_args.tokenizer_corpus, "tokenizer_corpus")
        check_tokenizer_inputs(model_args.model, tok_args)
    plan = plan_steps(data_args, cpt_args, training_args, Launcher.from_env().world_size)
    return sources, eval_sources, plan


def check_model_runtime(model_args: Any) -> tuple[str, str]:
    """Precision and attention, decided before any work: (master weights dtype, attention implementation)."""
    master = master_weights_dtype(model_args.master_weights_dtype, model_args.torch_dtype)
    return master, resolve_attn_implementation(model_args.attn_implementation)


def cpt_loss_implementation(cpt_args: CptArguments, training_args: Any) -> str:
    """``loss_implementation`` resolved for this run's device (xlt/train/losses.py)."""
    cuda = torch.cuda.is_available() and not getattr(training_args, "use_cpu", False)
    return resolve_loss_implementation(cpt_args.loss_implementation, cuda=cuda)


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


def tokenizer_stage_key(model_spec: str, tok_args: TokenizerArguments, sources: list[Source]) -> dict:
    return fingerprint(tok_args, {"model": model_spec, "sources": [s.name for s in sources]})


def prepare_model_dir(model_args: ModelArguments, tok_args: TokenizerArguments, sources: list[Source],
                      eval_texts: dict[str, list[str]], output_dir: str,
                      build: bool = True) -> tuple[str, Optional[dict]]:
    """The model to train from: the base, or the extended/swapped one in ``OUTPUT_DIR/tokenizer``.

    The extension is cached there, keyed by its settings: a second run with the same settings
    reuses it, a run with other settings rebuilds it. With ``build=False`` (the non-main processes of a
    multi-process launch) it waits, without a collective and so without ``ddp_timeout``, until the main
    process has built it.
    """
    base = resolve_model(model_args.model)
    if tok_args.tokenizer_mode == "none":
        return base, None
    tok_dir = os.path.join(output_dir, "tokenizer")
    key = tokenizer_stage_key(model_args.model, tok_args, sources)
    key_file = os.path.join(tok_dir, "xlt_tokenizer_key.json")
    report_file = os.path.join(tok_dir, "tokenizer_report.json")
    if not build:
        wait_for(lambda: file_equals_json(key_file, key) and os.path.isfile(report_file),
                 f"tokenizer stage in {tok_dir}", log=_log)
    if file_equals_json(key_file, key) and os.path.isfile(report_file):
        _log(f"tokenizer: reusing {tok_dir} (same settings)")
        with open(report_file, encoding="utf-8") as f:
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
    check_tokenizer_inputs(model_args.model, tok_args)
    claim_output_dir(out.output_dir, "tokenizer", fingerprint(model_args, tok_args))
    eval_texts = heldout_texts(sources, eval_sources, cpt_args.eval_max_docs)
    _, report = prepare_model_dir(model_args, tok_args, sources, eval_texts, out.output_dir)
    return report


def peak_device_memory_gb() -> Optional[float]:
    """The most GPU memory this process's tensors held so far (CUDA's allocator), in GiB; None on a CPU, where the
    process's resident size says nothing comparable to ``xlt check``'s per-GPU estimate."""
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


@dataclass
class CptRun:
    """One launch of continued pretraining: the parsed recipe and what ``run_cpt``'s input phase checked and
    decided (no model loaded), then what each later phase adds."""

    model_args: ModelArguments
    tok_args: TokenizerArguments
    data_args: DataArguments
    cpt_args: CptArguments
    training_args: Any
    sources: list[Source]
    eval_sources: Optional[list[Source]]
    plan: StepPlan
    settings: dict
    master_dtype: str
    attn: str
    launcher: Launcher
    t0: float
    lora: Optional[LoraSettings] = None
    new_rows: Any = None  # NewRowsSettings
    kd: Any = None  # KdSettings
    loss_impl: str = "model"
    partial: Any = None  # PartialSettings: only some layers train for a fraction of the steps
    # -- set by the phases
    save_dtype: str = ""
    model_dir: str = ""
    tok_report: Optional[dict] = None
    tokenizer: Any = None
    model: Any = None
    new_rows_opt: Optional[tuple] = None  # (NewRowsSettings, row ids) once the model is loaded
    throughput: Optional[dict] = None
    checkpointing: str = ""
    precision: Optional[dict] = None
    stream: Any = None
    guard: Any = None
    resume_from: Optional[str] = None
    resumed_step: int = 0
    distiller: Any = None
    sharding: Any = None  # FSDP2's sharding check (a callback), where launched so
    trainer: Optional[CptTrainer] = None
    result: Any = None  # what trainer.train returned
    peak_gb: Optional[float] = None  # training's peak device memory, before the gathered save
    in_sync: Optional[bool] = None  # replicas equal at the end
    final_dir: str = ""

    @property
    def output_dir(self) -> str:
        return self.training_args.output_dir


def run_cpt(model_args: ModelArguments, tok_args: TokenizerArguments, data_args: DataArguments,
            cpt_args: CptArguments, training_args: Any, lora: Optional[LoraSettings] = None) -> dict:
    """Run (or resume) continued pretraining; returns the report section it wrote."""
    run = check_run(model_args, tok_args, data_args, cpt_args, training_args, lora)
    _log(run.plan.describe())
    with run_lock(run.output_dir, "cpt"):
        eval_texts = claim_run_dir(run)
        load_cpt_model(run, eval_texts)
        done = build_run_data(run)
        if done is not None:
            return done
        build_distiller(run)
        train(run)
        save(run)
        return write_report(run)


def check_run(model_args: ModelArguments, tok_args: TokenizerArguments, data_args: DataArguments,
              cpt_args: CptArguments, training_args: Any, lora: Optional[LoraSettings]) -> CptRun:
    """Phase inputs: every check and decision that needs no model; ``training_args.max_steps`` set from the plan."""
    t0 = time.time()
    lora = lora if lora is not None and lora.use_lora else None
    sources, eval_sources, plan = check_cpt_inputs(model_args, tok_args, data_args, cpt_args, training_args)
    master_dtype, attn = check_model_runtime(model_args)
    if lora is not None:
        check_lora_model(model_args, lora)
    check_throughput_keys(model_args, trains_on_cuda(training_args), capability=cuda_capability(),
                          lora=lora is not None)
    new_rows = new_rows_settings(cpt_args, tok_args.tokenizer_mode, training_args, plan.max_steps, lora is not None)
    launcher = Launcher.from_env()
    check_fsdp_launch(training_args, launcher)
    kd = kd_settings(cpt_args, tok_args.tokenizer_mode, plan.max_steps, lora is not None, launcher.kind)
    layers = model_layers(model_args.model, model_args.trust_remote_code) if cpt_args.partial_training_fraction else None
    partial = partial_settings(cpt_args, plan.max_steps, lora is not None, launcher.world_size, launcher.kind, layers)
    loss_impl = cpt_loss_implementation(cpt_args, training_args)
    training_args.max_steps = plan.max_steps
    settings = fingerprint(model_args, tok_args, data_args, cpt_args, lora or {},
                           {k: getattr(training_args, k, None) for k in _RUN_KEYS},
                           exclude=("resume", "eval_max_docs", "max_consecutive_skips", "loss_by_language_steps",
                                    "loss_implementation", "save_dtype", "compile_blocks",
                                    "activation_checkpointing_every"))
    return CptRun(model_args, tok_args, data_args, cpt_args, training_args, sources, eval_sources, plan, settings,
                  master_dtype, attn, launcher, t0, lora, new_rows, kd, loss_impl, partial)


def check_lora_model(model_args: ModelArguments, lora: LoraSettings) -> None:
    """The LoRA target modules exist in the model (its config only; no weights are read)."""
    config = AutoConfig.from_pretrained(resolve_model(model_args.model), trust_remote_code=model_args.trust_remote_code)
    check_lora_targets(config, lora)


def new_row_ids(model: Any, base_spec: str, trust_remote_code: bool = False) -> list[int]:
    """Embedding rows the base tokenizer never uses: the new tokens of an extension plus padding rows."""
    base_ids = set(load_tokenizer(base_spec, trust_remote_code=trust_remote_code).get_vocab().values())
    rows = int(model.get_input_embeddings().weight.shape[0])
    return [i for i in range(rows) if i not in base_ids]


def build_cpt_trainer(model: Any, tokenizer: Any, training_args: Any, stream: Any, data_args: DataArguments,
                      plan: StepPlan, guard: Any, callbacks: Optional[list] = None,
                      loss_by_language_steps: int = 10, new_rows: Optional[tuple] = None,
                      distiller: Any = None, loss_implementation: str = "model") -> CptTrainer:
    """The Trainer of continued pretraining, wired as ``run_cpt`` runs it: skip-step guard, xlt state in every
    checkpoint, loss by language / token accounting / tokens/s / sequence length in the logs, progress postfix.
    The stream restores its own position, so the Trainer must not skip batches on resume (``ignore_data_skip``);
    shard rows are skipped by index by the Trainer (nothing is read)."""
    training_args.ignore_data_skip = not getattr(stream, "index_resume", False)
    training_args.remove_unused_columns = False  # keep the per-token language; compute_loss takes it out
    fields = [Throughput(plan.tokens_per_step),
              TokenAccounting(stream, plan.rows_per_step, plan.tokens_per_step, plan.max_steps, data_args, guard)]
    state_writer = XltStateCallback(stream, plan.rows_per_step, guard)
    return CptTrainer(model=model, args=training_args, train_dataset=stream,
                      data_collator=PackedRowsCollator(getattr(model.config, "_attn_implementation", None)),
                      processing_class=tokenizer,
                      callbacks=[*fields, state_writer, ProgressPostfix(), *(callbacks or [])],
                      guard=guard, state_writer=state_writer, new_rows=new_rows, distiller=distiller,
                      loss_implementation=loss_implementation, loss_by_language_steps=loss_by_language_steps)


def check_prepared_data(data_args: DataArguments, sources: list[Source], tokenizer: Any, output_dir: str) -> None:
    """``data_source: shards``: prepared data of other settings is refused (one line) before the model loads."""
    if data_args.data_source != "shards":
        return
    folder = prepared_dir_of(data_args, output_dir)
    if os.path.isfile(os.path.join(folder, KEY_FILE)):
        check_output_dir(folder, settings_key(sources, data_args, tokenizer, SHARD_BYTES))


def build_cpt_data(model_args: ModelArguments, data_args: DataArguments, sources: list[Source], tokenizer: Any,
                   model_dir: str, plan: StepPlan, output_dir: str, workers: int = 0) -> Any:
    """The training data: rows by index from token shards (``data_source: shards``, read in this process and its
    ``workers`` DataLoader workers), or the in-memory stream (``data_source: stream``)."""
    if data_args.data_source == "shards":
        return build_shard_dataset(sources, data_args, tokenizer, model_dir,
                                   prepared_dir_of(data_args, output_dir), plan.total_tokens,
                                   plan.rows_per_step, plan.max_steps, build=is_main_process(),
                                   trust_remote_code=model_args.trust_remote_code, log=_log, workers=workers)
    return build_pretrain_stream(data_args, tokenizer, plan.total_tokens, plan.rows_per_step)


def shard_report(stream: Any, resumed_step: int, plan: StepPlan, world_size: int) -> Optional[dict]:
    """report.json ``data`` of a run on shards (None on the in-memory stream): the prepared summary and the tokens
    each rank read (in its process and its DataLoader workers), counted in this launch plus the resumed steps'
    rows (each rank read its 1/world_size of them before the relaunch)."""
    if not getattr(stream, "index_resume", False):
        return None
    mine = stream.tokens_read + resumed_step * plan.tokens_per_step // world_size
    read = [int(mine)]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, mine)
        read = [int(x) for x in out]
    return {"source": "shards", "prepared_dir": stream.prepared_dir, "tokens_read_per_rank": read,
            "prepared": stream.rows.data.summary}


def claim_run_dir(run: CptRun) -> dict[str, list[str]]:
    """Phase run directory: claimed for these settings with the held-out split written (the main process first;
    the others then find it); the model pinned to its revision. Returns the held-out texts by language."""
    eval_texts = heldout_texts(run.sources, run.eval_sources, run.cpt_args.eval_max_docs)
    with run.training_args.main_process_first(local=False, desc="xlt run directory"):
        claim_output_dir(run.output_dir, "cpt", run.settings)
        for lang, docs in eval_texts.items():
            path = os.path.join(run.output_dir, "heldout", f"{lang}.jsonl")
            if not os.path.isfile(path):
                atomic_write_jsonl(path, [{"text": d} for d in docs])
    margs = run.model_args
    margs.model = resolve_revision(margs.model, margs.model_revision)
    run.save_dtype = base_save_dtype(margs.save_dtype, margs.model, margs.trust_remote_code)
    return eval_texts


def load_cpt_model(run: CptRun, eval_texts: dict[str, list[str]]) -> None:
    """Phases tokenizer and model: the tokenizer stage built by the main process (the others wait for it without
    a barrier timeout), prepared data of other settings refused, then the weights, LoRA, the new rows and the
    throughput keys."""
    margs = run.model_args
    run.model_dir, run.tok_report = prepare_model_dir(margs, run.tok_args, run.sources, eval_texts, run.output_dir,
                                                      build=is_main_process())
    run.tokenizer = load_tokenizer(run.model_dir, trust_remote_code=margs.trust_remote_code)
    check_prepared_data(run.data_args, run.sources, run.tokenizer, run.output_dir)  # before the weights load
    warn_pure_bf16(run.master_dtype)
    model = load_model(run.model_dir, run.master_dtype, run.attn, margs.trust_remote_code)
    model.config.use_cache = False  # a cache disables the packed (per-document) attention mask
    if run.lora is not None:
        new_ids = new_row_ids(model, margs.model, margs.trust_remote_code) if run.tok_report else []
        model = apply_lora(model, run.lora, new_ids, seed=run.training_args.seed)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        _log(f"LoRA r={run.lora.lora_r} on {run.lora.lora_target_modules}; new rows: {len(new_ids)} via "
             f"{run.lora.lora_new_rows}; {trainable:,} trainable parameters")
    if run.new_rows is not None and run.tok_report is not None:
        ids = new_row_ids(model, margs.model, margs.trust_remote_code)
        run.new_rows_opt = (run.new_rows, ids)
        _log(run.new_rows.describe(len(ids), run.plan.max_steps))
    run.model = model
    run.throughput = apply_throughput_keys(model, margs, run.training_args, run.launcher)
    run.checkpointing = own_activation_checkpointing(run.training_args, run.launcher)
    if run.throughput["checkpointed_layers"] is not None:
        run.checkpointing = f"every {margs.activation_checkpointing_every}"
    run.precision = precision_of(run.training_args)
    targs = run.training_args
    _log(f"launcher {run.launcher.describe()}; master weights {run.master_dtype}, compute "
         f"{'bf16' if targs.bf16 else 'fp16' if targs.fp16 else run.master_dtype}; precision "
         f"{run.precision['precision']} ({run.precision['source']}); attention {run.attn}; activation checkpointing "
         f"{run.checkpointing}; loss {run.loss_impl}"
         + (" (the distillation window's steps: model, from the logits)" if run.kd is not None
            and run.loss_impl != "model" else ""))


def build_run_data(run: CptRun) -> Optional[dict]:
    """Phase data: the training rows and the spike guard, both restored from the last complete checkpoint when
    resuming. Returns the report sections of a run that is already complete (nothing to do), else None."""
    run.stream = build_cpt_data(run.model_args, run.data_args, run.sources, run.tokenizer, run.model_dir, run.plan,
                                run.output_dir, run.training_args.dataloader_num_workers)
    # Checkpoints here can only be this run's: claim_output_dir refuses a directory holding another run.
    run.resume_from = last_complete_checkpoint(run.output_dir) if run.cpt_args.resume else None
    run.guard = SkipStepGuard.from_args(run.cpt_args)
    if not run.resume_from:
        return None
    with open(os.path.join(run.resume_from, STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    run.stream.load_state_dict(state["stream"])
    if state.get("guard"):
        run.guard.load_state_dict(state["guard"])
    run.resumed_step = int(state["global_step"])
    _log(f"resuming from {run.resume_from} (step {state['global_step']}, no batch replay)")
    if run.resumed_step >= run.plan.max_steps and os.path.isfile(os.path.join(run.output_dir, "cpt", "config.json")):
        _log(f"the run is complete ({run.plan.max_steps} steps); nothing to do")
        with open(os.path.join(run.output_dir, "report.json"), encoding="utf-8") as f:
            report = json.load(f)
        return {k: report[k] for k in ("tokens_trained", "cpt", "tokenizer") if k in report}
    return None


def build_distiller(run: CptRun) -> None:
    """Phase distillation (``kd_weight`` > 0): the base model as teacher, its count continued on resume."""
    if run.kd is None:
        return
    targs = run.training_args
    compute = "bfloat16" if targs.bf16 else "float16" if targs.fp16 else run.master_dtype
    run.distiller = Distiller.build(run.kd, run.model_args.model, run.model_dir,
                                    int(run.model.get_input_embeddings().weight.shape[0]), compute, run.attn,
                                    run.model_args.trust_remote_code, load_teacher=run.kd.active_at(run.resumed_step),
                                    shard=run.launcher.kind == "fsdp")
    if run.resume_from:
        run.distiller.load(run.resume_from)
    _log(run.kd.describe(run.plan.max_steps) + f"; teacher {compute}, {run.distiller.n_teacher:,} effective parameters")


def train(run: CptRun) -> None:
    """Phase train: FSDP2 set up where launched so, the trainer built and run, training's peak device memory
    read. A guard that stopped the run ends it here with one line (exit 2)."""
    fsdp_setup = setup_fsdp(run.training_args, run.launcher)
    run.sharding = sharding = sharding_check() if run.launcher.name == "fsdp2" else None
    if fsdp_setup:
        _log(fsdp_setup)
    callbacks = [sharding] if sharding is not None else []
    if run.partial is not None:
        callbacks.append(PartialTraining(run.model, run.partial))
        _log(run.partial.describe(run.plan.max_steps))
    rows = run.new_rows_opt
    trainer = build_cpt_trainer(run.model, run.tokenizer, run.training_args, run.stream, run.data_args, run.plan,
                                run.guard, callbacks=callbacks or None,
                                loss_by_language_steps=run.cpt_args.loss_by_language_steps,
                                new_rows=rows if rows and rows[0].active and rows[1] else None,
                                distiller=run.distiller, loss_implementation=run.loss_impl)
    run.trainer = trainer
    run.result = trainer.train(resume_from_checkpoint=run.resume_from)
    run.peak_gb = peak_device_memory_gb()
    if run.guard.stop_requested:  # the guard saved a checkpoint and stopped the run
        trainer.accelerator.wait_for_everyone()
        raise XltError(run.guard.stop_message(run.output_dir, trainer.state.global_step))


def save(run: CptRun) -> None:
    """Phase save (every process: the weights are gathered when sharded), after comparing the replicas."""
    trainer = run.trainer
    run.in_sync = check_replicas(trainer.model_wrapped, trainer.accelerator, trainer.state.global_step)
    run.final_dir = os.path.join(run.output_dir, "cpt")
    save_final_model(trainer.model_wrapped, run.tokenizer, run.final_dir, trainer.accelerator, dtype=run.save_dtype)


def write_report(run: CptRun) -> dict:
    """Phase report: report.json's ``tokens_trained``, ``cpt``, ``tokenizer`` and (on shards) ``data`` sections,
    merged into the run's report by the main process. Collectives inside: every process calls it."""
    kd_state = None
    if run.distiller is not None:
        run.distiller.release()
        kd_state = run.distiller.state()  # a collective: every process
        _log(f"distillation: {kd_state['teacher_tokens']:,} teacher tokens = {kd_state['distill_flops']:.3g} FLOPs")
    trainer = run.trainer
    steps = trainer.state.global_step
    accounting = run.stream.accounting_at(steps * run.plan.rows_per_step) if trainer.is_world_process_zero() else {}
    seconds = time.time() - run.t0
    section = {"tokens_trained": accounting.get("tokens_trained", {}),
               "cpt": cpt_section(run, accounting, seconds, kd_state),
               "tokenizer": tokenizer_section(run.tok_args, run.tok_report)}
    data_section = shard_report(run.stream, run.resumed_step, run.plan,
                                run.launcher.world_size)  # a collective: every process
    if data_section is not None:
        section["data"] = data_section
    if trainer.is_world_process_zero():
        update_report(run.output_dir, section)
    _log(f"done: {steps} steps in {seconds:.0f}s; model in {run.final_dir} ({run.save_dtype})")
    return section


def cpt_section(run: CptRun, accounting: dict, seconds: float, kd_state: Optional[dict]) -> dict:
    """report.json ``cpt``: what ran, how fast, in which precision and layout, and what it trained."""
    trainer = run.trainer
    steps = trainer.state.global_step
    section = {
        "model": run.model_args.model, "model_dir": run.final_dir, "steps": steps,
        "tokens_per_step": run.plan.tokens_per_step, "train_loss": round(float(run.result.training_loss), 4),
        "skipped_steps": run.guard.skipped, "seconds": round(seconds, 1),
        "train_tokens_per_second": round(run.plan.tokens_per_step * steps / max(seconds, 1e-9), 1),
        "world_size": run.launcher.world_size, "launcher": run.launcher.name, "replicas_in_sync": run.in_sync,
        "master_weights_dtype": run.master_dtype, "attn_implementation": run.attn,
        "packed_layout": trainer.data_collator.layout, "activation_checkpointing": run.checkpointing,
        "loss_implementation": trainer.loss_implementation_used,
        "precision": run.precision["precision"], "precision_source": run.precision["source"],
        "save_dtype": run.save_dtype, "throughput": run.throughput, "peak_memory_gb": run.peak_gb,
        "mode": "lora" if run.lora is not None else "full", "accounting": accounting,
        "cleaning": getattr(run.stream, "cleaning_report", {}),
    }
    if run.sharding is not None:
        section["sharded_parameters"] = run.sharding.summary["sharded"]
    if run.new_rows_opt is not None:
        section["new_rows"] = run.new_rows_opt[0].report(len(run.new_rows_opt[1]))
    if run.partial is not None:
        section["partial_training"] = run.partial.report()
    if kd_state is not None:
        kd = run.kd
        section["distill_flops"] = kd_state["distill_flops"]
        if run.loss_impl != "model":
            section["loss_implementation_kd_steps"] = "model"
        section["kd"] = {"weight": kd.weight, "steps": kd.steps, "temperature": kd.temperature,
                         "teacher_tokens": kd_state["teacher_tokens"], "teacher_params": kd_state["teacher_params"],
                         "vocabulary_match": "identity" if kd.identity else "expand_new_ids"}
    return section


def tokenizer_section(tok_args: TokenizerArguments, tok_report: Optional[dict]) -> dict:
    """report.json ``tokenizer``: kept, or extended / swapped with its characters per token."""
    if tok_report is None:
        return {"mode": "none", "new_tokens": 0}
    return {"mode": tok_args.tokenizer_mode, "ja_chars_per_token": tok_report["chars_per_token"]["ja"],
            "en_chars_per_token": tok_report["chars_per_token"]["en"], "new_tokens": tok_report["new_tokens"],
            "unreachable": tok_report.get("unreachable")}
