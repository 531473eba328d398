"""Instruction SFT with TRL's SFTTrainer on prompt-completion pairs (loss on the completion only).

Phases: inputs → model → data → train → save → report. The run directory is the recipe's
``output_dir`` (shared with continued pretraining); SFT checkpoints go to ``sft-checkpoints/``
and the final model to ``sft/``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from xlt.config import SftArguments, XltError
from xlt.data.sft import check_sft_specs, load_instruction_examples
from xlt.io import update_report
from xlt.models import check_model_spec, load_model, load_tokenizer, resolve_revision
from xlt.train.checkpoint import claim_output_dir, fingerprint, last_trainer_checkpoint
from xlt.train.distributed import check_replicas, save_final_model
from xlt.train.lock import run_lock
from xlt.train.runtime import (
    Launcher,
    master_weights_dtype,
    own_activation_checkpointing,
    resolve_attn_implementation,
    warn_pure_bf16,
)

_RUN_KEYS = ("learning_rate", "lr_scheduler_type", "weight_decay", "num_train_epochs", "max_steps",
             "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "max_length", "bf16")


def _log(msg: str) -> None:
    print(f"[xlt sft] {msg}", flush=True)


def resolve_sft_model(sft_args: SftArguments, run_dir: str) -> str:
    if sft_args.model:
        return sft_args.model
    cpt_dir = os.path.join(run_dir, "cpt")
    if not os.path.isdir(cpt_dir):
        raise XltError(f"model: no model given and {cpt_dir} does not exist (run continued pretraining first, "
                       "or pass --model)")
    return cpt_dir


def run_sft(sft_args: SftArguments, training_args: Any) -> dict:
    t0 = time.time()
    run_dir = training_args.output_dir
    # -- phase: inputs --------------------------------------------------------------------------
    check_sft_specs(sft_args.sft_datasets)
    model_spec = resolve_sft_model(sft_args, run_dir)
    check_model_spec(model_spec)
    if sft_args.prompt_format not in ("stablelm_alpaca", "chat"):
        raise XltError(f"prompt_format={sft_args.prompt_format!r}: expected stablelm_alpaca or chat")
    master = master_weights_dtype(sft_args.master_weights_dtype, sft_args.torch_dtype)
    attn = resolve_attn_implementation(sft_args.attn_implementation)
    launcher = Launcher.from_env()
    settings = fingerprint(sft_args, {k: getattr(training_args, k, None) for k in _RUN_KEYS})
    with run_lock(run_dir, "sft"):
        return _run_sft_locked(sft_args, training_args, model_spec, settings, master, attn, launcher, t0)


def _run_sft_locked(sft_args: SftArguments, training_args: Any, model_spec: str, settings: dict, master: str,
                    attn: str, launcher: Launcher, t0: float) -> dict:
    run_dir = training_args.output_dir
    with training_args.main_process_first(local=False, desc="xlt run directory"):
        same_run = claim_output_dir(run_dir, "sft", settings)
    final_dir = os.path.join(run_dir, "sft")
    if same_run and os.path.isfile(os.path.join(final_dir, "config.json")):
        _log(f"the run is complete ({final_dir} exists); nothing to do")
        return {}
    training_args.output_dir = os.path.join(run_dir, "sft-checkpoints")

    # -- phase: model ---------------------------------------------------------------------------
    model_spec = resolve_revision(model_spec, sft_args.model_revision)
    tokenizer = load_tokenizer(model_spec, trust_remote_code=training_args.trust_remote_code)
    warn_pure_bf16(master)
    model = load_model(model_spec, master, attn, trust_remote_code=training_args.trust_remote_code)
    checkpointing = own_activation_checkpointing(training_args, launcher)
    _log(f"launcher {launcher.describe()}; master weights {master}; attention {attn}; "
         f"activation checkpointing {checkpointing}")

    # -- phase: data ----------------------------------------------------------------------------
    import datasets

    examples = load_instruction_examples(sft_args.sft_datasets, sft_args.prompt_format, tokenizer)
    train = datasets.Dataset.from_list(examples)
    _log(f"{len(train)} instruction examples x {training_args.num_train_epochs} epochs, prompt={sft_args.prompt_format}")

    # -- phase: train ---------------------------------------------------------------------------
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer)
    last = last_trainer_checkpoint(training_args.output_dir)
    result = trainer.train(resume_from_checkpoint=last)

    # -- phase: save + report (every rank: the weights are gathered when sharded) ----------------------
    in_sync = check_replicas(trainer.model_wrapped, trainer.accelerator, trainer.state.global_step)
    save_final_model(trainer.model_wrapped, tokenizer, final_dir, trainer.accelerator)
    section = {"sft": {"model": model_spec, "model_dir": final_dir, "examples": len(train),
                       "epochs": training_args.num_train_epochs, "steps": trainer.state.global_step,
                       "train_loss": round(float(result.training_loss), 4), "seconds": round(time.time() - t0, 1),
                       "prompt_format": sft_args.prompt_format, "world_size": launcher.world_size,
                       "replicas_in_sync": in_sync, "master_weights_dtype": master, "attn_implementation": attn,
                       "activation_checkpointing": checkpointing}}
    if trainer.is_world_process_zero():
        update_report(run_dir, section)
    _log(f"done: {trainer.state.global_step} steps; model in {final_dir}")
    return section
