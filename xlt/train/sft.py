"""Instruction SFT with TRL's SFTTrainer on tokenized rows whose labels carry the loss mask.

Phases: inputs → tokenizer + data → model → train → save → generate → report. The run directory is the recipe's
``output_dir`` (shared with continued pretraining); SFT checkpoints go to ``sft-checkpoints/`` and the
final model to ``sft/``, with ``generation_config.json`` (the format's stop tokens as ``eos_token_id``)
and ``xlt_sft.json`` (the prompt format, read by ``xlt chat``).

Why SFTTrainer takes our rows as they are (trl 1.16, ``SFTTrainer._prepare_dataset``): a dataset with an
``input_ids`` column is "processed" and not re-tokenized; a ``labels`` column is used as is (masks are only
folded in when it is absent); truncation to ``max_length`` is a no-op on rows we already cut (and counted);
``DataCollatorForLanguageModeling`` pads ``labels`` with -100. So the labels built here are the labels trained.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, Optional

from xlt.config import SftArguments, XltError
from xlt.data import sft_format
from xlt.data.sft import check_sft_specs, load_sft_data
from xlt.data.sft_format import PROMPT_FORMATS, SFT_INFO_FILE
from xlt.io import atomic_write_json, update_report
from xlt.log import logger
from xlt.models import (
    check_model_spec,
    generate_greedy,
    load_model,
    load_tokenizer,
    resolve_model,
    resolve_revision,
)
from xlt.tokenizer.embeddings import resize_and_init
from xlt.train.checkpoint import claim_output_dir, fingerprint, last_trainer_checkpoint
from xlt.train.distributed import base_save_dtype, check_replicas, save_final_model
from xlt.train.fsdp import check_fsdp_launch, setup_fsdp, sharding_check
from xlt.train.lock import run_lock
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

_RUN_KEYS = ("learning_rate", "lr_scheduler_type", "weight_decay", "num_train_epochs", "max_steps",
             "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "max_length", "bf16",
             "packing", "packing_strategy")
# Learning rate when the recipe does not set one (LoRA adapters start at zero and need a larger step).
LORA_LEARNING_RATE, FULL_LEARNING_RATE = 2e-4, 2e-5
# Fixed Japanese instructions generated after training (report.json sft.generations), greedy.
GENERATION_INSTRUCTIONS = ("日本の首都はどこですか？", "健康的な朝ごはんを一つ提案してください。",
                           "「ありがとう」を英語に翻訳してください。")
GENERATION_MAX_NEW_TOKENS = 48
_EVAL_SPLIT_SEED = 0
IGNORE = -100


_log = logger("xlt sft")


def resolve_sft_model(sft_args: SftArguments, run_dir: str) -> str:
    if sft_args.model:
        return sft_args.model
    cpt_dir = os.path.join(run_dir, "cpt")
    if not os.path.isdir(cpt_dir):
        raise XltError(f"model: no model given and {cpt_dir} does not exist (run continued pretraining first, "
                       "or pass --model)")
    return cpt_dir


# ---------------------------------------------------------------------------------------------
# Inputs (no model loaded)
# ---------------------------------------------------------------------------------------------
def learning_rate_given(argv: Sequence[str]) -> bool:
    """Whether the recipe (``--config`` YAML) or the command line sets ``learning_rate``.

    Needed because the parsed value cannot tell: SFTConfig defaults to 2e-5 (TrainingArguments to 5e-5),
    and a recipe may set exactly that value.
    """
    argv = list(argv)
    if any(a == "--learning_rate" or a.startswith("--learning_rate=") for a in argv):
        return True
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        from xlt.config import read_recipe_yaml

        return "learning_rate" in read_recipe_yaml(argv[argv.index("--config") + 1])
    return False


def resolve_learning_rate(training_args: Any, use_lora: bool, given: Optional[bool]) -> float:
    """Set the default learning rate (2e-4 LoRA, 2e-5 full) unless the recipe set one; returns the rate used.

    ``given=None`` (a caller that built the arguments itself): the value in ``training_args`` is kept.
    """
    if given is False:
        training_args.learning_rate = LORA_LEARNING_RATE if use_lora else FULL_LEARNING_RATE
    return float(training_args.learning_rate)


def check_sft_inputs(sft_args: SftArguments, training_args: Any) -> tuple[str, Any]:
    """Everything checkable before a model loads; returns the model spec and the LoRA settings (None
    without LoRA). Data specs first, then the model. LoRA target modules are checked against the model's
    config (a meta-device model: no weights read)."""
    check_sft_specs(sft_args.sft_datasets)
    model_spec = resolve_sft_model(sft_args, training_args.output_dir)
    check_model_spec(model_spec)
    if sft_args.prompt_format not in PROMPT_FORMATS:
        raise XltError(f"prompt_format={sft_args.prompt_format!r}: expected stablelm_alpaca or chat")
    if sft_args.chat_template and sft_args.prompt_format != "chat":
        raise XltError(f"chat_template={sft_args.chat_template!r} needs prompt_format: chat "
                       f"(got {sft_args.prompt_format})")
    if getattr(training_args, "packing", False):
        if getattr(training_args, "packing_strategy", "bfd") == "wrapped":
            raise XltError("packing_strategy=wrapped cuts examples across rows; use bfd (xlt cuts examples longer "
                           "than max_length itself and counts them, so no example is split across rows)")
        if getattr(training_args, "max_length", None) is None:
            raise XltError("packing: true needs max_length (the packed row length)")
    lora = sft_args.lora_settings()
    if not lora.use_lora:
        return model_spec, None
    from transformers import AutoConfig

    from xlt.train.lora import check_lora_targets

    config = AutoConfig.from_pretrained(resolve_model(model_spec),
                                        trust_remote_code=getattr(training_args, "trust_remote_code", False))
    check_lora_targets(config, lora)
    return model_spec, lora


# ---------------------------------------------------------------------------------------------
# Data: tokenized rows {"input_ids", "labels"} (labels -100 where no loss)
# ---------------------------------------------------------------------------------------------
def _sft_datasets(sft_args: SftArguments, tokenizer: Any, max_length: Optional[int]) -> tuple[list, list, dict]:
    """Tokenized train / eval rows ``{"input_ids", "labels"}`` and counts per dataset name.

    Conversations come from :func:`xlt.data.sft.load_sft_data` (adapters, duplicates, cap, held-out split
    before weighting, every row counted) and are rendered and labelled by
    :func:`xlt.data.sft_format.build_sft_dataset` (loss on every assistant turn and its stop token only).
    counts[name] holds the data counts (``SFT_COUNT_KEYS``) plus ``truncated`` (cut at max_length) and
    ``fully_masked`` (dropped: no trained token left), each split as ``train_`` / ``eval_`` and summed, and
    ``train_rows`` / ``eval_rows`` (the rows actually used): ``train == train_rows + train_fully_masked``.
    """
    data = load_sft_data(sft_args.sft_datasets, eval_fraction=sft_args.eval_fraction, seed=_EVAL_SPLIT_SEED)
    train, train_counts = sft_format.build_sft_dataset(data.train, sft_args.prompt_format, tokenizer, max_length)
    evals, eval_counts = sft_format.build_sft_dataset(data.eval, sft_args.prompt_format, tokenizer, max_length)
    counts: dict[str, dict[str, int]] = {}
    for name, c in data.counts.items():
        tc, ec = train_counts.get(name, {}), eval_counts.get(name, {})
        out = dict(c)
        for key in ("truncated", "fully_masked"):
            out[f"train_{key}"], out[f"eval_{key}"] = tc.get(key, 0), ec.get(key, 0)
            out[key] = out[f"train_{key}"] + out[f"eval_{key}"]
        out["train_rows"] = c["train"] - out["train_fully_masked"]
        out["eval_rows"] = c["eval"] - out["eval_fully_masked"]
        counts[name] = out
    if not train:
        raise XltError(f"sft_datasets: no training example left: all {sum(c['train'] for c in data.counts.values())} "
                       f"are fully masked at max_length={max_length} (raise max_length)")
    return train, evals, counts


def stop_token_ids(sft_args: SftArguments, tokenizer: Any) -> list[int]:
    """The token ids that end an answer in the training format (trained as the last label of each answer)."""
    return sft_format.stop_token_ids(sft_args.prompt_format, tokenizer)


def prompt_ids(instruction: str, prompt_format: str, tokenizer: Any) -> list[int]:
    """The token ids of a single-turn prompt, exactly as training tokenized prompts (up to the answer)."""
    return sft_format.generation_prompt_ids([{"role": "user", "content": instruction}], prompt_format, tokenizer)


# ---------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------
def eval_losses(log_history: list[dict]) -> list[dict]:
    """``[{"epoch", "eval_loss"}]`` from the Trainer's log history, in order."""
    return [{"epoch": round(float(h["epoch"]), 4), "eval_loss": round(float(h["eval_loss"]), 4)}
            for h in log_history if "eval_loss" in h]


def _eval_logger() -> Any:
    from transformers import TrainerCallback

    class EvalLossLog(TrainerCallback):
        """One log line per evaluation (main process): the epoch and its held-out loss."""

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if state.is_world_process_zero and metrics and "eval_loss" in metrics:
                _log(f"epoch {state.epoch:.2f}: eval loss {metrics['eval_loss']:.4f}")

    return EvalLossLog()


def build_sft_trainer(model: Any, tokenizer: Any, training_args: Any, train_rows: list[dict],
                      eval_rows: list[dict], callbacks: Optional[list] = None) -> Any:
    """TRL's SFTTrainer on tokenized rows; with held-out rows, evaluation at the end of every epoch."""
    import datasets
    from transformers.trainer_utils import IntervalStrategy
    from trl import SFTTrainer

    train = datasets.Dataset.from_list(train_rows)
    evals = datasets.Dataset.from_list(eval_rows) if eval_rows else None
    if evals is not None:
        training_args.eval_strategy = IntervalStrategy.EPOCH
        training_args.do_eval = True
    else:
        training_args.eval_strategy = IntervalStrategy.NO
    return SFTTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=evals,
                      processing_class=tokenizer, callbacks=[_eval_logger(), *(callbacks or [])])


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
def write_generation_files(final_dir: str, tokenizer: Any, stop_ids: list[int], sft_args: SftArguments,
                           max_length: Optional[int]) -> None:
    """``final_dir/generation_config.json`` with ``eos_token_id`` = the stop ids, then ``xlt_sft.json``
    (prompt format, chat template, stop ids) — last, as the mark of a complete run. Main process only."""
    import json

    from transformers import AutoConfig, GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(final_dir)
    except OSError:
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(final_dir))
    gen.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else list(stop_ids)
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    atomic_write_json(os.path.join(final_dir, "generation_config.json"), json.loads(gen.to_json_string()))
    atomic_write_json(os.path.join(final_dir, SFT_INFO_FILE),
                      {"prompt_format": sft_args.prompt_format, "chat_template": sft_args.chat_template,
                       "stop_token_ids": list(stop_ids), "max_length": max_length})


def sample_generations(trainer: Any, tokenizer: Any, sft_args: SftArguments, stop_ids: list[int],
                       max_new_tokens: int = GENERATION_MAX_NEW_TOKENS) -> list[dict]:
    """Greedy answers of the trained model to GENERATION_INSTRUCTIONS; call on EVERY rank.

    Replicated weights (one process, DDP): the main process generates, the others return []. Sharded
    weights (FSDP2, DeepSpeed): every rank generates (each forward is a collective; ``synced_gpus`` keeps
    the ranks stepping together) and all return the same list.
    """
    from xlt.train.distributed import is_deepspeed, is_sharded

    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    sharded = is_deepspeed(trainer.accelerator) or any(is_sharded(p) for p in model.parameters())
    if not sharded and not trainer.is_world_process_zero():
        return []
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    out = []
    for instruction in GENERATION_INSTRUCTIONS:
        new = generate_greedy(model, prompt_ids(instruction, sft_args.prompt_format, tokenizer), stop_ids, pad,
                        max_new_tokens, synced_gpus=sharded)
        out.append({"instruction": instruction, "output": tokenizer.decode(new, skip_special_tokens=True).strip(),
                    "tokens": len(new), "stopped": len(new) < max_new_tokens})
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------
def run_sft(sft_args: SftArguments, training_args: Any, learning_rate_given: Optional[bool] = None) -> dict:
    """Run (or resume) SFT; returns the report section it wrote.

    ``learning_rate_given``: whether the recipe set ``learning_rate`` (False: the LoRA / full default is used;
    None: ``training_args.learning_rate`` is kept as given).
    """
    t0 = time.time()
    run_dir = training_args.output_dir
    # -- phase: inputs --------------------------------------------------------------------------
    model_spec, lora = check_sft_inputs(sft_args, training_args)
    lr = resolve_learning_rate(training_args, lora is not None, learning_rate_given)
    master = master_weights_dtype(sft_args.master_weights_dtype, sft_args.torch_dtype)
    attn = resolve_attn_implementation(sft_args.attn_implementation)
    check_throughput_keys(sft_args, trains_on_cuda(training_args), capability=cuda_capability(), lora=lora is not None)
    launcher = Launcher.from_env()
    check_fsdp_launch(training_args, launcher)
    settings = fingerprint(sft_args, {k: getattr(training_args, k, None) for k in _RUN_KEYS},
                           exclude=("save_dtype", "compile_blocks", "activation_checkpointing_every"))
    with run_lock(run_dir, "sft"):
        return _run_sft_locked(sft_args, training_args, model_spec, settings, master, attn, launcher, t0, lora, lr)


def grow_for_chatml(model: Any, tokenizer: Any, pieces: dict[str, list[int]]) -> None:
    """The model's side of ``install_chatml``: the embeddings grow to fit the added tokens (``pieces``: each with its
    old ids, from ``chatml_pieces`` before the install), each new row (input and untied output) the mean of the old
    rows of its pieces (xlt.tokenizer.embeddings.resize_and_init; old rows stay bit-identical); the model's EOS
    becomes ``<|im_end|>`` and generation stops at the ChatML stop tokens."""
    new_ids = {tokenizer.convert_tokens_to_ids(t): t for t in pieces}
    old_rows = int(model.get_input_embeddings().weight.shape[0])
    if new_ids:
        keep = {i: i for i in range(old_rows) if i not in new_ids}
        rows = {i: pieces[t] for i, t in new_ids.items() if pieces[t]}
        resize_and_init(model, max(old_rows, max(new_ids) + 1), keep, rows, method="subword_mean")
    model.config.eos_token_id = tokenizer.eos_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = sft_format.stop_token_ids("chat", tokenizer)
        gen.pad_token_id = tokenizer.pad_token_id


def _chatml_model(sft_args: SftArguments, training_args: Any, tokenizer: Any, model_spec: str, master: str,
                  attn: str) -> tuple[Any, list[int]]:
    """``chat_template: chatml``: the template installed, its new tokens' rows added to the model (loaded here, before
    the data, since it resizes); ``(model, new token ids)``. Otherwise ``(None, [])``: the model loads after the data."""
    if sft_args.chat_template != "chatml":
        return None, []
    model = load_model(model_spec, master, attn, trust_remote_code=training_args.trust_remote_code)
    pieces = sft_format.chatml_pieces(tokenizer)
    added = sft_format.install_chatml(tokenizer)
    grow_for_chatml(model, tokenizer, pieces)
    _log(f"ChatML template installed; new special tokens: {', '.join(added) or 'none'}")
    return model, [int(i) for i in tokenizer.convert_tokens_to_ids(added)]


def _log_data(training_args: Any, sft_args: SftArguments, train_rows: list, eval_rows: list, counts: dict) -> None:
    for name, c in counts.items():
        _log(f"{name}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
    truncated = sum(c.get("truncated", 0) for c in counts.values())
    _log(f"{len(train_rows)} train / {len(eval_rows)} eval examples x {training_args.num_train_epochs} epochs, "
         f"prompt={sft_args.prompt_format}; {truncated} cut at max_length={training_args.max_length}")
    if training_args.packing:
        _log(f"packing ({training_args.packing_strategy}, padding-free): whole examples per row, none split "
             f"across rows ({truncated} longer than max_length were cut to it, counted above)")


def _with_lora(model: Any, lora: Any, new_ids: list[int], seed: int) -> Any:
    from xlt.train.lora import apply_lora

    model = apply_lora(model, lora, new_ids, seed=seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _log(f"LoRA r={lora.lora_r} alpha={lora.lora_alpha} on {lora.lora_target_modules}; {trainable:,} trainable "
         f"parameters")
    return model


def _sft_model(model: Any, sft_args: SftArguments, training_args: Any, master: str, attn: str, launcher: Launcher,
               lora: Any, new_ids: list[int], lr: float) -> tuple[Any, dict]:
    """Phase model: LoRA where asked, the throughput keys applied. Returns the model and report.json's runtime
    keys (master weights, attention, activation checkpointing, precision, throughput)."""
    if lora is not None:
        model = _with_lora(model, lora, new_ids, training_args.seed)
    throughput = apply_throughput_keys(model, sft_args, training_args, launcher)
    checkpointing = own_activation_checkpointing(training_args, launcher)
    if throughput["checkpointed_layers"] is not None:
        checkpointing = f"every {sft_args.activation_checkpointing_every}"
    precision = precision_of(training_args)
    _log(f"launcher {launcher.describe()}; master weights {master}; precision {precision['precision']} "
         f"({precision['source']}); attention {attn}; "
         f"activation checkpointing {checkpointing}; learning rate {lr:g} ({'lora' if lora else 'full'})")
    return model, {"master_weights_dtype": master, "attn_implementation": attn, "activation_checkpointing": checkpointing,
                   "precision": precision["precision"], "precision_source": precision["source"],
                   "throughput": throughput}


def _run_sft_locked(sft_args: SftArguments, training_args: Any, model_spec: str, settings: dict, master: str,
                    attn: str, launcher: Launcher, t0: float, lora: Any, lr: float) -> dict:
    run_dir = training_args.output_dir
    with training_args.main_process_first(local=False, desc="xlt run directory"):
        same_run = claim_output_dir(run_dir, "sft", settings)
    final_dir = os.path.join(run_dir, "sft")
    if same_run and os.path.isfile(os.path.join(final_dir, SFT_INFO_FILE)):
        _log(f"the run is complete ({final_dir} exists); nothing to do")
        return {}
    training_args.output_dir = os.path.join(run_dir, "sft-checkpoints")

    # -- phase: tokenizer + data (before the model loads: data errors cost no model load) -----------
    model_spec = resolve_revision(model_spec, sft_args.model_revision)
    save_dtype = base_save_dtype(sft_args.save_dtype, model_spec, training_args.trust_remote_code)
    tokenizer = load_tokenizer(model_spec, trust_remote_code=training_args.trust_remote_code)
    warn_pure_bf16(master)
    model, new_ids = _chatml_model(sft_args, training_args, tokenizer, model_spec, master, attn)
    max_length = training_args.max_length
    train_rows, eval_rows, counts = _sft_datasets(sft_args, tokenizer, max_length)
    _log_data(training_args, sft_args, train_rows, eval_rows, counts)

    if model is None:
        model = load_model(model_spec, master, attn, trust_remote_code=training_args.trust_remote_code)
    model, runtime = _sft_model(model, sft_args, training_args, master, attn, launcher, lora, new_ids, lr)

    # -- phase: train ---------------------------------------------------------------------------
    fsdp_setup = setup_fsdp(training_args, launcher)
    if fsdp_setup:
        _log(fsdp_setup)
    sharding = sharding_check() if launcher.name == "fsdp2" else None
    trainer = build_sft_trainer(model, tokenizer, training_args, train_rows, eval_rows,
                                callbacks=[sharding] if sharding is not None else None)
    last = last_trainer_checkpoint(training_args.output_dir)
    result = trainer.train(resume_from_checkpoint=last)
    losses = eval_losses(trainer.state.log_history)

    # -- phase: save + generate + report (every rank: the weights are gathered when sharded) ----------
    in_sync = check_replicas(trainer.model_wrapped, trainer.accelerator, trainer.state.global_step)
    save_final_model(trainer.model_wrapped, tokenizer, final_dir, trainer.accelerator, dtype=save_dtype)
    stop_ids = stop_token_ids(sft_args, tokenizer)
    generations = sample_generations(trainer, tokenizer, sft_args, stop_ids)
    section = {"sft": {"model": model_spec, "model_dir": final_dir, "examples": len(train_rows) + len(eval_rows),
                       "train_examples": len(train_rows), "eval_examples": len(eval_rows),
                       "epochs": training_args.num_train_epochs, "steps": trainer.state.global_step,
                       "train_loss": round(float(result.training_loss), 4), "eval_loss": losses,
                       "counts": counts, "learning_rate": lr, "mode": "lora" if lora is not None else "full",
                       "max_length": max_length, "packing": bool(training_args.packing),
                       "stop_token_ids": stop_ids, "generations": generations,
                       "seconds": round(time.time() - t0, 1), "prompt_format": sft_args.prompt_format,
                       "chat_template": sft_args.chat_template, "world_size": launcher.world_size,
                       "replicas_in_sync": in_sync, **runtime, "save_dtype": save_dtype}}
    if trainer.is_world_process_zero():
        for g in generations:
            _log(f"{g['instruction']} → {g['output']}")
        update_report(run_dir, section)
        write_generation_files(final_dir, tokenizer, stop_ids, sft_args, max_length)
    trainer.accelerator.wait_for_everyone()
    _log(f"done: {trainer.state.global_step} steps; model in {final_dir}")
    return section
