"""Continued pretraining on transformers' Trainer.

Phases (each named in the log): inputs → tokenizer → model → data → train → save → report.
Every input check runs in the first phase, before any model is loaded.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

from xlt.config import (
    CptArguments,
    DataArguments,
    ModelArguments,
    TokenizerArguments,
    XltError,
    validate_data_args,
)
from xlt.data.sources import LANGS, Source, heldout_texts, load_sources
from xlt.data.steps import StepPlan, plan_steps
from xlt.data.stream import LANG_KEY
from xlt.io import atomic_save_dir, atomic_write_json, atomic_write_jsonl, update_report
from xlt.log import logger
from xlt.models import check_model_spec, load_model, load_tokenizer, resolve_model, resolve_revision
from xlt.train.checkpoint import (
    STATE_FILE,
    claim_output_dir,
    fingerprint,
    last_complete_checkpoint,
    rotate_complete_checkpoints,
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
from xlt.train.lock import run_lock
from xlt.train.lora import LoraSettings
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

# TrainingArguments that change what a run computes (the rest — logging, saving, paths — may differ on resume).
_RUN_KEYS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta1",
             "adam_beta2", "adam_epsilon", "max_grad_norm", "per_device_train_batch_size",
             "gradient_accumulation_steps", "max_steps", "seed", "bf16", "fp16", "optim")


_log = logger("xlt cpt")


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
    check_model_runtime(model_args)
    if tok_args.tokenizer_mode not in ("none", "extend", "swap"):
        raise XltError(f"tokenizer_mode={tok_args.tokenizer_mode!r}: expected none, extend or swap")
    if tok_args.tokenizer_mode != "none":
        from xlt.tokenizer.extend import check_tokenizer_inputs

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
    import torch

    from xlt.train.losses import resolve_loss_implementation

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
    from xlt.tokenizer.extend import build_tokenizer_stage

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
    from xlt.tokenizer.extend import check_tokenizer_inputs

    check_tokenizer_inputs(model_args.model, tok_args)
    claim_output_dir(out.output_dir, "tokenizer", fingerprint(model_args, tok_args))
    eval_texts = heldout_texts(sources, eval_sources, cpt_args.eval_max_docs)
    _, report = prepare_model_dir(model_args, tok_args, sources, eval_texts, out.output_dir)
    return report


def loss_by_language(logits: Any, labels: Any, langs: Any, n_langs: int) -> tuple[Any, Any]:
    """Per-language sums of next-token cross-entropy and token counts of one batch (no gradient, no host sync).

    Position t predicts ``labels[t + 1]`` (the causal shift the model's own loss uses); the target's language
    decides the bucket; ignored labels (-100, each segment's first token) count nowhere. The fp32 upcast runs a
    chunk of positions at a time (xlt/train/losses.py), the buckets are one one-hot reduction.
    """
    from xlt.train.losses import logits_language_sums

    return logits_language_sums(logits, labels, langs, n_langs)


def peak_device_memory_gb() -> Optional[float]:
    """The most GPU memory this process's tensors held so far (CUDA's allocator), in GiB; None on a CPU, where the
    process's resident size says nothing comparable to ``xlt check``'s per-GPU estimate."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


def total_trained(trained: dict) -> int:
    return int(sum(trained.values()))


def _make_trainer_class():
    import torch
    from transformers import Trainer

    from xlt.train.skip_step import SkipStepCallback, SkipStepOptimizer, check_backend

    class XltTrainer(Trainer):
        """Trainer plus: the skip-step guard on the optimizer step, token accounting and tokens/s in every log,
        checkpoints marked complete (and replicas compared) before any old one is rotated away.

        The guard (``xlt_guard``, a ``SkipStepGuard``) wraps the raw optimizer before accelerate does, is fed
        each micro-batch loss (a device tensor, no sync) and the grad norm the clipper reduced, and judges
        each step on values all-reduced over the processes (xlt/train/skip_step.py).
        """

        xlt_guard = None
        xlt_stream = None
        xlt_rows_per_step = 1
        xlt_tokens_per_step = 0
        xlt_state_writer = None
        xlt_data_args = None
        xlt_loss_by_language_steps = 10
        xlt_replicas_in_sync: Optional[bool] = None
        xlt_new_rows = None  # (NewRowsSettings, new row ids): the new rows' own AdamW treatment (xlt/train/new_rows.py)
        xlt_kd = None  # Distiller: the distillation term from the base model early in training (xlt/train/kd.py)
        xlt_collator = None  # PackedRowsCollator: the batch layout the attention kernel keeps per-document
        _xlt_kd_acc = None  # [summed KL, scored positions] since the last log (kd_loss)
        _xlt_new_rows_opt = None
        _xlt_head_module = None  # the output head module and how the loss applies it (_xlt_head)
        _xlt_projection = None
        _xlt_last_log: Optional[tuple[float, int]] = None
        _xlt_lang_loss: Optional[list] = None
        xlt_loss_implementation = "model"  # chunked / liger / model (resolve_loss_implementation)

        def _guard_on(self) -> bool:
            return self.xlt_guard is not None and self.xlt_guard.enabled

        def train(self, *args: Any, **kwargs: Any):
            check_backend(self, self.xlt_guard)  # DeepSpeed steps and clips itself: refuse before any work
            if self._guard_on() and not any(isinstance(c, SkipStepCallback) for c in self.callback_handler.callbacks):
                self.add_callback(SkipStepCallback(self.xlt_guard))
            return super().train(*args, **kwargs)

        def create_optimizer(self, *args: Any, **kwargs: Any):
            opt = super().create_optimizer(*args, **kwargs)
            if self.xlt_new_rows is not None and self._xlt_new_rows_opt is None:
                from xlt.train.new_rows import wrap_new_rows

                # Inside the skip-step wrapper: a skipped step never reaches it.
                settings, ids = self.xlt_new_rows
                self.optimizer = opt = self._xlt_new_rows_opt = wrap_new_rows(
                    opt, self.model, ids, settings, step_of=lambda: self.state.global_step)
            if self._guard_on() and not isinstance(opt, SkipStepOptimizer):
                self.optimizer = opt = SkipStepOptimizer(opt, self.xlt_guard)
            return opt

        def _prepare_inputs(self, inputs):
            # Each process's own rows, after accelerate's dispatch: flattened here on the flash path (see
            # xlt/data/collate.py), before compute_loss and the forward pass see them.
            inputs = super()._prepare_inputs(inputs)
            return self.xlt_collator.for_model(inputs) if self.xlt_collator is not None else inputs

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self._xlt_new_rows_opt is not None:
                self._xlt_new_rows_opt.arm()  # the next optimizer step is a training step
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self._guard_on():
                # The Trainer divides each micro-batch loss by the accumulation steps; undo it so the guard
                # averages micro-batch losses. A tensor op: nothing is read back until the optimizer step.
                self.xlt_guard.record_loss(loss * self.current_gradient_accumulation_steps, self.state.global_step + 1)
            return loss

        def _run_epoch(self, *args: Any, **kwargs: Any):
            # Resumed from the last checkpoint of a finished run (a crash before the final save): an
            # IterableDataset run counts max_steps as one epoch, so the Trainer would start "epoch 1" and train
            # one step too many. Nothing is left to train: stop, and let the caller save the model.
            if self.state.max_steps and self.state.global_step >= self.state.max_steps:
                self.control.should_training_stop = True
                return None
            return super()._run_epoch(*args, **kwargs)

        def _save_checkpoint(self, model, trial) -> None:
            # The Trainer rotates old checkpoints inside _save_checkpoint, before xlt_state.json marks the new one
            # complete: a crash in between would leave nothing to resume. Save with rotation off, compare the
            # replicas, mark the checkpoint complete, and only then rotate (complete checkpoints only).
            limit = self.args.save_total_limit
            self.args.save_total_limit = None
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.save_total_limit = limit
            self.xlt_replicas_in_sync = check_replicas(self.model_wrapped, self.accelerator, self.state.global_step)
            run_dir = self._get_output_dir(trial=trial)
            if self.xlt_kd is not None:  # the teacher's compute so far, before the checkpoint is marked complete
                from xlt.train.kd import KD_STATE_FILE

                kd_state = self.xlt_kd.state()  # a collective: every process
                if self.args.should_save:
                    atomic_write_json(os.path.join(run_dir, f"checkpoint-{self.state.global_step}", KD_STATE_FILE),
                                      kd_state)
            if self.args.should_save and self.xlt_state_writer is not None:
                self.xlt_state_writer.write(run_dir, self.state.global_step)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                rotate_complete_checkpoints(run_dir, limit)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # The stream sends each token's language; the model must not see it. On the micro-batches of every
            # xlt_loss_by_language_steps-th step only, the per-token losses are summed by language and reported at
            # the next log: the other steps pay nothing. The LM loss comes from the last hidden states without the
            # full logits (xlt_loss_implementation chunked / liger, xlt/train/losses.py) except on the steps that
            # carry the distillation term (xlt/train/kd.py), which needs the student's logits, and under "model".
            langs = inputs.pop(LANG_KEY, None)
            every = self.xlt_loss_by_language_steps
            measure = langs is not None and every > 0 and (self.state.global_step + 1) % every == 0
            kd = self.xlt_kd is not None and self.xlt_kd.teacher is not None and model.training
            if kd and not self.xlt_kd.settings.active_at(self.state.global_step):
                self.xlt_kd.release()  # the window is over (global_step: the same on every process)
                kd = False
            if (self.xlt_loss_implementation in ("chunked", "liger") and not kd and not return_outputs
                    and "labels" in inputs and self.label_smoother is None and self.compute_loss_func is None
                    and self._xlt_head() is not None):
                loss, by_lang = self._xlt_hidden_loss(model, inputs, num_items_in_batch, langs if measure else None)
                if by_lang is not None:
                    self._xlt_add_lang_loss(*by_lang)
                return loss
            if not measure and not kd:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            logits = getattr(outputs, "logits", None) if not isinstance(outputs, dict) else outputs.get("logits")
            if kd:
                loss = loss + self._xlt_kd_term(logits, inputs, num_items_in_batch)
            if measure and logits is not None:
                self._xlt_add_lang_loss(*loss_by_language(logits, inputs["labels"], langs, len(LANGS)))
            return (loss, outputs) if return_outputs else loss

        def _xlt_add_lang_loss(self, sums, counts) -> None:
            if self._xlt_lang_loss is None:
                self._xlt_lang_loss = [torch.zeros_like(sums), torch.zeros_like(counts)]
            self._xlt_lang_loss[0] += sums
            self._xlt_lang_loss[1] += counts

        def _xlt_head(self):
            """The output head's projection for the loss from hidden states (xlt/train/losses.py
            ``head_projection``), or None where only the model's logits will do (a peft-wrapped head under FSDP2:
            those steps use the logits path, said once in the log)."""
            from xlt.train.losses import head_projection, output_head

            if self._xlt_head_module is None:
                self._xlt_head_module = output_head(self.accelerator.unwrap_model(self.model_wrapped))
                self._xlt_projection = head_projection(self._xlt_head_module)
                if self._xlt_projection is None and self.is_world_process_zero():
                    print(f"[xlt cpt] loss: the model's logits ({self.xlt_loss_implementation} needs a plain output "
                          f"head under FSDP2; this one is wrapped by peft)", flush=True)
            return self._xlt_projection

        def _xlt_hidden_loss(self, model, inputs, num_items_in_batch, langs):
            """The LM loss from the last hidden states, normalised as the Trainer's compute_loss normalises the
            model's loss, and (with ``langs``) the per-language sums of the same tokens.

            The wrapped model runs as usual (DDP / FSDP2 hooks fire, the hidden states are one of its outputs) with
            ``logits_to_keep`` an empty index: the head projects no position. The head is then called per chunk.
            """
            from xlt.train.losses import (
                chunked_causal_lm_loss,
                forward_hidden,
                liger_causal_lm_loss,
                per_token_ce,
                shift_targets,
            )

            labels, shift = inputs["labels"], inputs.get("shift_labels")
            hidden = forward_hidden(model, {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")})
            head, project = self._xlt_head_module, self._xlt_head()
            vocab = int(head.weight.shape[0])
            items = num_items_in_batch if self.model_accepts_loss_kwargs else None
            if self.xlt_loss_implementation == "liger" and type(head) is torch.nn.Linear and head.bias is None:
                loss = liger_causal_lm_loss(hidden, head.weight.to(hidden.dtype), labels, items, shift)
                by_lang = None
                if langs is not None:  # one extra no-grad projection on the measured steps only
                    from xlt.train.losses import language_sums, shift_langs

                    with torch.no_grad():
                        targets = shift_targets(labels, shift).to(hidden.device)
                        ce = per_token_ce(hidden.detach(), project, targets, vocab)
                        by_lang = language_sums(ce, targets, shift_langs(langs), len(LANGS))
            else:  # chunked, or liger on a head it cannot take (a peft wrapper, a bias)
                loss, by_lang = chunked_causal_lm_loss(hidden, project, labels, vocab, items, shift, langs, len(LANGS))
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and items is not None:
                scale = self.accelerator.num_processes // self.get_tp_size()  # as Trainer.compute_loss scales
                loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
            return loss, by_lang

        def _xlt_kd_term(self, logits, inputs, num_items_in_batch):
            """``kd_weight`` x the micro-batch's distillation term, normalised as the Trainer normalises the LM loss
            (by the scored tokens of the whole accumulated step over every process, or as a micro-batch mean that
            the Trainer then divides by the accumulation steps), so the step's term is the mean over its scored
            positions."""
            total, n = self.xlt_kd.kd_sum(logits, inputs)
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                term = total / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    term = term * (self.accelerator.num_processes // self.get_tp_size())
            else:
                term = total / max(n, 1)
            acc = torch.stack([total.detach().double(), torch.tensor(float(n), dtype=torch.float64,
                                                                        device=total.device)])
            self._xlt_kd_acc = acc if self._xlt_kd_acc is None else self._xlt_kd_acc + acc
            return self.xlt_kd.settings.weight * term

        def _log_kd(self, logs: dict) -> None:
            """``kd_loss``: the mean distillation KL (before kd_weight) over the positions scored since the last log."""
            if self._xlt_kd_acc is None:
                return
            acc = self._xlt_kd_acc
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(acc)
            if acc[1] > 0:
                logs["kd_loss"] = round(float(acc[0] / acc[1]), 4)
            self._xlt_kd_acc = None

        def _log_loss_by_language(self, logs: dict) -> None:
            """``loss_<lang>`` over the tokens measured since the last log (summed over every process)."""
            if self._xlt_lang_loss is None:
                return
            both = torch.cat(self._xlt_lang_loss)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(both)
            values, n = both.tolist(), len(LANGS)  # the log's one host sync
            for i, lang in enumerate(LANGS):
                if values[n + i] > 0:
                    logs[f"loss_{lang}"] = round(values[i] / values[n + i], 4)
            self._xlt_lang_loss = None

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if getattr(dataset, "index_resume", False):  # shard rows: in order, the curriculum is the order
                return torch.utils.data.SequentialSampler(dataset)
            return super()._get_train_sampler(train_dataset)

        def _get_grad_norm(self, model, grad_norm=None):
            # transformers 5.24 computes the global (cross-rank) norm here on every optimizer step, clipping or
            # not (max_grad_norm 0: clip_grad_norm_ with max inf). Without it the guard checks the gradients itself.
            grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
            if self._guard_on():
                self.xlt_guard.record_grad_norm(grad_norm, self.state.global_step + 1)
            return grad_norm

        def log(self, logs: dict, start_time: Optional[float] = None) -> None:
            if "loss" in logs:
                self._log_loss_by_language(logs)  # every process: an all-reduce
                self._log_kd(logs)  # idem, while the distillation window has left a sum
                now, step = time.time(), self.state.global_step
                if self._xlt_last_log is not None and step > self._xlt_last_log[1]:
                    dt = max(now - self._xlt_last_log[0], 1e-9)
                    logs["tokens_per_second"] = round((step - self._xlt_last_log[1]) * self.xlt_tokens_per_step / dt, 1)
                self._xlt_last_log = (now, step)
            # Only the main process iterates the stream (accelerate dispatches batches from it).
            if self.xlt_stream is not None and "loss" in logs and self.is_world_process_zero():
                acc = self.xlt_stream.accounting_at(self.state.global_step * self.xlt_rows_per_step)
                trained = acc.get("tokens_trained", {})
                total = sum(trained.values()) or 1
                logs["tokens_trained"] = total
                for lang, n in trained.items():
                    logs[f"tokens_trained_{lang}"] = n
                logs["ja_share_cum"] = round(trained.get("ja", 0) / total, 4)
                if self.xlt_data_args is not None:
                    from xlt.data.schedule import cumulative_ja_share, ja_ratio, seq_len_at

                    args, total = self.xlt_data_args, self.xlt_tokens_per_step * self.args.max_steps
                    logs["ja_share_target"] = round(ja_ratio(total_trained(trained), total, args), 4)
                    logs["ja_share_cum_target"] = cumulative_ja_share(total_trained(trained), total, args)
                    logs["seq_len"] = seq_len_at(total_trained(trained), total, args)
                if self.xlt_guard is not None:
                    logs["skipped_steps"] = self.xlt_guard.skipped
            super().log(logs, start_time)

        def on_train_begin_xlt(self) -> None:
            """Called from the Trainer's on_train_begin, after a resumed checkpoint's state is loaded."""
            self._xlt_last_log = (time.time(), self.state.global_step)

    return XltTrainer


def run_cpt(model_args: ModelArguments, tok_args: TokenizerArguments, data_args: DataArguments,
            cpt_args: CptArguments, training_args: Any, lora: Optional[LoraSettings] = None) -> dict:
    """Run (or resume) continued pretraining; returns the report section it wrote."""
    t0 = time.time()
    output_dir = training_args.output_dir
    lora = lora if lora is not None and lora.use_lora else None
    # -- phase: inputs (no model loaded yet) ---------------------------------------------------
    sources, eval_sources, plan = check_cpt_inputs(model_args, tok_args, data_args, cpt_args, training_args)
    master_dtype, attn = check_model_runtime(model_args)
    if lora is not None:
        check_lora_model(model_args, lora)
    check_throughput_keys(model_args, trains_on_cuda(training_args), capability=cuda_capability(),
                          lora=lora is not None)
    from xlt.train.new_rows import new_rows_settings

    new_rows = new_rows_settings(cpt_args, tok_args.tokenizer_mode, training_args, plan.max_steps, lora is not None)
    launcher = Launcher.from_env()
    check_fsdp_launch(training_args, launcher)
    from xlt.train.kd import kd_settings

    kd = kd_settings(cpt_args, tok_args.tokenizer_mode, plan.max_steps, lora is not None, launcher.kind)
    loss_impl = cpt_loss_implementation(cpt_args, training_args)
    training_args.max_steps = plan.max_steps
    settings = fingerprint(model_args, tok_args, data_args, cpt_args, lora or {},
                           {k: getattr(training_args, k, None) for k in _RUN_KEYS},
                           exclude=("resume", "eval_max_docs", "max_consecutive_skips", "loss_by_language_steps",
                                    "loss_implementation", "save_dtype", "compile_blocks",
                                    "activation_checkpointing_every"))
    _log(plan.describe())
    with run_lock(output_dir, "cpt"):
        return _run_cpt_locked(model_args, tok_args, data_args, cpt_args, training_args, sources, eval_sources,
                               plan, settings, master_dtype, attn, launcher, t0, lora, new_rows, kd, loss_impl)


def check_lora_model(model_args: ModelArguments, lora: LoraSettings) -> None:
    """The LoRA target modules exist in the model (its config only; no weights are read)."""
    from transformers import AutoConfig

    from xlt.train.lora import check_lora_targets

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
                      distiller: Any = None, loss_implementation: str = "model") -> Any:
    """The Trainer of continued pretraining, wired as ``run_cpt`` runs it: skip-step guard, xlt state in every
    checkpoint, token accounting / tokens/s / sequence length in the logs, progress postfix. The stream
    restores its own position, so the Trainer must not skip batches on resume (``ignore_data_skip``)."""
    from xlt.data.collate import PackedRowsCollator
    from xlt.train.callbacks import OnTrainBegin, ProgressPostfix, XltStateCallback

    # The stream restores its own position; shard rows are skipped by index by the Trainer (nothing is read).
    training_args.ignore_data_skip = not getattr(stream, "index_resume", False)
    training_args.remove_unused_columns = False  # keep the per-token language; compute_loss takes it out
    state_writer, postfix = XltStateCallback(stream, plan.rows_per_step, guard), ProgressPostfix()
    collator = PackedRowsCollator(getattr(model.config, "_attn_implementation", None))  # the kernel it runs
    trainer = _make_trainer_class()(model=model, args=training_args, train_dataset=stream,
                                    data_collator=collator, processing_class=tokenizer,
                                    callbacks=[state_writer, postfix, *(callbacks or [])])
    trainer.xlt_collator = collator
    postfix.handler = trainer.callback_handler
    trainer.add_callback(OnTrainBegin(trainer.on_train_begin_xlt))
    trainer.xlt_guard, trainer.xlt_stream, trainer.xlt_rows_per_step = guard, stream, plan.rows_per_step
    trainer.xlt_tokens_per_step, trainer.xlt_state_writer = plan.tokens_per_step, state_writer
    trainer.xlt_data_args, trainer.xlt_loss_by_language_steps = data_args, loss_by_language_steps
    trainer.xlt_new_rows = new_rows  # (NewRowsSettings, ids) or None
    trainer.xlt_kd = distiller  # xlt.train.kd.Distiller or None
    trainer.xlt_loss_implementation = loss_implementation  # chunked / liger / model (resolved)
    return trainer


def check_prepared_data(data_args: DataArguments, sources: list[Source], tokenizer: Any, output_dir: str) -> None:
    """``data_source: shards``: prepared data of other settings is refused (one line) before the model loads."""
    if data_args.data_source != "shards":
        return
    from xlt.data.prepare import KEY_FILE, SHARD_BYTES, check_output_dir, prepared_dir_of, settings_key

    folder = prepared_dir_of(data_args, output_dir)
    if os.path.isfile(os.path.join(folder, KEY_FILE)):
        check_output_dir(folder, settings_key(sources, data_args, tokenizer, SHARD_BYTES))


def build_cpt_data(model_args: ModelArguments, data_args: DataArguments, sources: list[Source], tokenizer: Any,
                   model_dir: str, plan: StepPlan, output_dir: str, workers: int = 0) -> Any:
    """The training data: rows by index from token shards (``data_source: shards``, read in this process and its
    ``workers`` DataLoader workers), or the in-memory stream (``data_source: stream``)."""
    if data_args.data_source == "shards":
        from xlt.data.prepare import prepared_dir_of
        from xlt.data.shards import build_shard_dataset

        return build_shard_dataset(sources, data_args, tokenizer, model_dir,
                                   prepared_dir_of(data_args, output_dir), plan.total_tokens,
                                   plan.rows_per_step, plan.max_steps, build=is_main_process(),
                                   trust_remote_code=model_args.trust_remote_code, log=_log, workers=workers)
    from xlt.data.stream import build_pretrain_stream

    return build_pretrain_stream(data_args, tokenizer, plan.total_tokens, plan.rows_per_step)


def shard_report(stream: Any, resumed_step: int, plan: StepPlan, world_size: int) -> Optional[dict]:
    """report.json ``data`` of a run on shards (None on the in-memory stream): the prepared summary and the tokens
    each rank read (in its process and its DataLoader workers), counted in this launch plus the resumed steps'
    rows (each rank read its 1/world_size of them before the relaunch)."""
    import torch

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


def _run_cpt_locked(model_args, tok_args, data_args, cpt_args, training_args, sources, eval_sources, plan,
                    settings, master_dtype, attn, launcher, t0, lora=None, new_rows=None, kd=None,
                    loss_impl="model") -> dict:
    output_dir = training_args.output_dir
    eval_texts = heldout_texts(sources, eval_sources, cpt_args.eval_max_docs)
    # The main process claims the directory and writes the held-out split first; the others then find it.
    with training_args.main_process_first(local=False, desc="xlt run directory"):
        claim_output_dir(output_dir, "cpt", settings)
        for lang, docs in eval_texts.items():
            path = os.path.join(output_dir, "heldout", f"{lang}.jsonl")
            if not os.path.isfile(path):
                atomic_write_jsonl(path, [{"text": d} for d in docs])
    model_args.model = resolve_revision(model_args.model, model_args.model_revision)
    save_dtype = base_save_dtype(model_args.save_dtype, model_args.model, model_args.trust_remote_code)

    # -- phase: tokenizer: built by the main process; the others wait for it without a barrier timeout ---------
    model_dir, tok_report = prepare_model_dir(model_args, tok_args, sources, eval_texts, output_dir,
                                              build=is_main_process())

    # -- phase: model ---------------------------------------------------------------------------
    tokenizer = load_tokenizer(model_dir, trust_remote_code=model_args.trust_remote_code)
    check_prepared_data(data_args, sources, tokenizer, output_dir)  # before the weights load
    warn_pure_bf16(master_dtype)
    model = load_model(model_dir, master_dtype, attn, model_args.trust_remote_code)
    model.config.use_cache = False  # a cache disables the packed (per-document) attention mask
    if lora is not None:
        from xlt.train.lora import apply_lora

        new_ids = new_row_ids(model, model_args.model, model_args.trust_remote_code) if tok_report else []
        model = apply_lora(model, lora, new_ids, seed=training_args.seed)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        _log(f"LoRA r={lora.lora_r} on {lora.lora_target_modules}; new rows: {len(new_ids)} via {lora.lora_new_rows}; "
             f"{trainable:,} trainable parameters")
    new_rows_opt = None
    if new_rows is not None and tok_report is not None:
        ids = new_row_ids(model, model_args.model, model_args.trust_remote_code)
        new_rows_opt = (new_rows, ids)
        _log(new_rows.describe(len(ids), plan.max_steps))
    throughput = apply_throughput_keys(model, model_args, training_args, launcher)
    checkpointing = own_activation_checkpointing(training_args, launcher)
    if throughput["checkpointed_layers"] is not None:
        checkpointing = f"every {model_args.activation_checkpointing_every}"
    precision = precision_of(training_args)
    _log(f"launcher {launcher.describe()}; master weights {master_dtype}, compute "
         f"{'bf16' if training_args.bf16 else 'fp16' if training_args.fp16 else master_dtype}; precision "
         f"{precision['precision']} ({precision['source']}); attention {attn}; activation checkpointing {checkpointing}; "
         f"loss {loss_impl}"
         + (" (the distillation window's steps: model, from the logits)" if kd is not None and loss_impl != "model"
            else ""))

    # -- phase: data ----------------------------------------------------------------------------
    stream = build_cpt_data(model_args, data_args, sources, tokenizer, model_dir, plan, output_dir,
                            training_args.dataloader_num_workers)
    # Checkpoints here can only be this run's: claim_output_dir refuses a directory holding another run.
    resume_from = last_complete_checkpoint(output_dir) if cpt_args.resume else None
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
    distiller = None
    if kd is not None:
        from xlt.train.kd import Distiller

        done = int(state["global_step"]) if resume_from else 0
        compute = "bfloat16" if training_args.bf16 else "float16" if training_args.fp16 else master_dtype
        distiller = Distiller.build(kd, model_args.model, model_dir, int(model.get_input_embeddings().weight.shape[0]),
                                    compute, attn, model_args.trust_remote_code, load_teacher=kd.active_at(done),
                                    shard=launcher.kind == "fsdp")
        if resume_from:
            distiller.load(resume_from)
        _log(kd.describe(plan.max_steps) + f"; teacher {compute}, {distiller.n_teacher:,} effective parameters")

    # -- phase: train ---------------------------------------------------------------------------
    fsdp_setup = setup_fsdp(training_args, launcher)
    sharding = sharding_check() if launcher.name == "fsdp2" else None
    if fsdp_setup:
        _log(fsdp_setup)
    trainer = build_cpt_trainer(model, tokenizer, training_args, stream, data_args, plan, guard,
                                callbacks=[sharding] if sharding is not None else None,
                                loss_by_language_steps=cpt_args.loss_by_language_steps,
                                new_rows=new_rows_opt if new_rows_opt and new_rows_opt[0].active and new_rows_opt[1] else None,
                                distiller=distiller, loss_implementation=loss_impl)
    result = trainer.train(resume_from_checkpoint=resume_from)
    peak_gb = peak_device_memory_gb()  # training's peak, before the gathered save
    if guard.stop_requested:  # the guard saved a checkpoint and stopped the run: end with one line (exit 2)
        trainer.accelerator.wait_for_everyone()
        raise XltError(guard.stop_message(output_dir, trainer.state.global_step))

    kd_state = None
    if distiller is not None:
        distiller.release()
        kd_state = distiller.state()  # a collective: every process
        _log(f"distillation: {kd_state['teacher_tokens']:,} teacher tokens = {kd_state['distill_flops']:.3g} FLOPs")

    # -- phase: save (every rank: the weights are gathered when sharded) -----------------------------
    in_sync = check_replicas(trainer.model_wrapped, trainer.accelerator, trainer.state.global_step)
    final_dir = os.path.join(output_dir, "cpt")
    save_final_model(trainer.model_wrapped, tokenizer, final_dir, trainer.accelerator, dtype=save_dtype)

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
            "world_size": launcher.world_size,
            "launcher": launcher.name,
            "replicas_in_sync": in_sync,
            "master_weights_dtype": master_dtype,
            "attn_implementation": attn,
            "packed_layout": trainer.xlt_collator.layout,
            "activation_checkpointing": checkpointing,
            "loss_implementation": loss_impl if trainer._xlt_head_module is None or trainer._xlt_projection is not None
            else "model",
            "precision": precision["precision"],
            "precision_source": precision["source"],
            "save_dtype": save_dtype,
            "throughput": throughput,
            "peak_memory_gb": peak_gb,
            "mode": "lora" if lora is not None else "full",
            "accounting": accounting,
            "cleaning": getattr(stream, "cleaning_report", {}),
        },
    }
    if sharding is not None:
        section["cpt"]["sharded_parameters"] = sharding.summary["sharded"]
    if new_rows_opt is not None:
        section["cpt"]["new_rows"] = new_rows_opt[0].report(len(new_rows_opt[1]))
    if kd_state is not None:
        section["cpt"]["distill_flops"] = kd_state["distill_flops"]
        if loss_impl != "model":
            section["cpt"]["loss_implementation_kd_steps"] = "model"
        section["cpt"]["kd"] = {"weight": kd.weight, "steps": kd.steps, "temperature": kd.temperature,
                                "teacher_tokens": kd_state["teacher_tokens"], "teacher_params": kd_state["teacher_params"],
                                "vocabulary_match": "identity" if kd.identity else "expand_new_ids"}
    if tok_report is None:
        section["tokenizer"] = {"mode": "none", "new_tokens": 0}
    else:
        section["tokenizer"] = {
            "mode": tok_args.tokenizer_mode,
            "ja_chars_per_token": tok_report["chars_per_token"]["ja"],
            "en_chars_per_token": tok_report["chars_per_token"]["en"],
            "new_tokens": tok_report["new_tokens"],
            "unreachable": tok_report.get("unreachable"),
        }
    data_section = shard_report(stream, int(state["global_step"]) if resume_from else 0, plan,
                                launcher.world_size)  # a collective: every process
    if data_section is not None:
        section["data"] = data_section
    if trainer.is_world_process_zero():
        update_report(output_dir, section)
    _log(f"done: {trainer.state.global_step} steps in {seconds:.0f}s; model in {final_dir} ({save_dtype})")
    return section
