"""``CptTrainer``: transformers' Trainer for continued pretraining.

What it adds to the Trainer, each in one place:
- the skip-step guard around the optimizer step (``guard``, xlt/train/skip_step.py), fed each micro-batch loss
  (a device tensor, no sync) and the grad norm the clipper reduced, judging each step on values all-reduced over
  the processes; the new rows' own AdamW treatment inside it (``new_rows``, xlt/train/new_rows.py);
- the LM loss from the last hidden states without the full logits (``loss_implementation`` chunked / liger,
  xlt/train/losses.py), the loss by language on every ``loss_by_language_steps``-th step, and the distillation
  term (``distiller``, xlt/train/kd.py ``kd_loss_term``);
- checkpoints marked complete (replicas compared, xlt state and the teacher's count written) before any old
  checkpoint is rotated away;
- the log line's fields as callbacks (xlt/train/callbacks.py ``LogFields``: loss by language, distillation loss,
  tokens/s, token accounting).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from transformers import Trainer

from xlt.data.sources import LANGS
from xlt.data.stream import LANG_KEY
from xlt.io import atomic_write_json
from xlt.train.callbacks import DistillationLoss, LanguageLoss, LogFields, ProgressPostfix
from xlt.train.checkpoint import rotate_complete_checkpoints
from xlt.train.distributed import check_replicas
from xlt.train.kd import KD_STATE_FILE, kd_loss_term
from xlt.train.losses import (
    chunked_causal_lm_loss,
    forward_hidden,
    head_projection,
    language_sums,
    liger_causal_lm_loss,
    logits_language_sums,
    output_head,
    per_token_ce,
    shift_langs,
    shift_targets,
)
from xlt.train.new_rows import wrap_new_rows
from xlt.train.skip_step import SkipStepCallback, SkipStepOptimizer, check_backend


class CptTrainer(Trainer):
    """The Trainer plus the keyword arguments below (every other argument is the Trainer's).

    ``guard``: a ``SkipStepGuard`` or None. ``state_writer``: the ``XltStateCallback`` that writes xlt_state.json
    into each checkpoint. ``new_rows``: ``(NewRowsSettings, row ids)`` or None. ``distiller``: a ``Distiller`` or
    None. ``loss_implementation``: chunked / liger / model (resolved for the device). ``loss_by_language_steps``:
    measure the loss by language on every n-th step (0: never).
    """

    def __init__(self, *args: Any, guard: Any = None, state_writer: Any = None, new_rows: Optional[tuple] = None,
                 distiller: Any = None, loss_implementation: str = "model", loss_by_language_steps: int = 10,
                 **kwargs: Any) -> None:
        self.xlt_language_loss = LanguageLoss(LANGS)
        self.xlt_kd_loss = DistillationLoss()
        callbacks = [self.xlt_language_loss, self.xlt_kd_loss, *(kwargs.pop("callbacks", None) or [])]
        if guard is not None and guard.enabled:
            callbacks.append(SkipStepCallback(guard))
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self.xlt_guard, self.xlt_state_writer, self.xlt_new_rows = guard, state_writer, new_rows
        self.xlt_kd, self.xlt_loss_implementation = distiller, loss_implementation
        self.xlt_loss_by_language_steps = loss_by_language_steps
        self.xlt_replicas_in_sync: Optional[bool] = None
        self._new_rows_opt = None
        self._head_module: Any = None  # the output head module and how the loss applies it (head_for_loss)
        self._projection: Any = None
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, ProgressPostfix):
                cb.handler = self.callback_handler  # the bar belongs to the handler's ProgressCallback

    def _guard_on(self) -> bool:
        return self.xlt_guard is not None and self.xlt_guard.enabled

    def train(self, *args: Any, **kwargs: Any):
        check_backend(self, self.xlt_guard)  # DeepSpeed steps and clips itself: refuse before any work
        return super().train(*args, **kwargs)

    def create_optimizer(self, *args: Any, **kwargs: Any):
        opt = super().create_optimizer(*args, **kwargs)
        if self.xlt_new_rows is not None and self._new_rows_opt is None:
            settings, ids = self.xlt_new_rows  # inside the skip-step wrapper: a skipped step never reaches it
            self.optimizer = opt = self._new_rows_opt = wrap_new_rows(
                opt, self.model, ids, settings, step_of=lambda: self.state.global_step)
        if self._guard_on() and not isinstance(opt, SkipStepOptimizer):
            self.optimizer = opt = SkipStepOptimizer(opt, self.xlt_guard)
        return opt

    def _prepare_inputs(self, inputs):
        # Each process's own rows, after accelerate's dispatch: flattened here on the flash path (see
        # xlt/data/collate.py), before compute_loss and the forward pass see them.
        inputs = super()._prepare_inputs(inputs)
        for_model = getattr(self.data_collator, "for_model", None)
        return for_model(inputs) if for_model is not None else inputs

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._new_rows_opt is not None:
            self._new_rows_opt.arm()  # the next optimizer step is a training step
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._guard_on():
            # The Trainer divides each micro-batch loss by the accumulation steps; undo it so the guard averages
            # micro-batch losses. A tensor op: nothing is read back until the optimizer step.
            self.xlt_guard.record_loss(loss * self.current_gradient_accumulation_steps, self.state.global_step + 1)
        return loss

    def _run_epoch(self, *args: Any, **kwargs: Any):
        # Resumed from the last checkpoint of a finished run (a crash before the final save): an IterableDataset
        # run counts max_steps as one epoch, so the Trainer would start "epoch 1" and train one step too many.
        # Nothing is left to train: stop, and let the caller save the model.
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
        # The rows carry each token's language; the model must not see it. On the micro-batches of every
        # loss_by_language_steps-th step only, the per-token losses are summed by language (reported at the next
        # log line): the other steps pay nothing. The LM loss comes from the last hidden states except on the
        # steps that carry the distillation term, which needs the student's logits, and under "model".
        langs = inputs.pop(LANG_KEY, None)
        every = self.xlt_loss_by_language_steps
        measure = langs is not None and every > 0 and (self.state.global_step + 1) % every == 0
        kd = self.xlt_kd is not None and self.xlt_kd.teacher is not None and model.training
        if kd and not self.xlt_kd.settings.active_at(self.state.global_step):
            self.xlt_kd.release()  # the window is over (global_step: the same on every process)
            kd = False
        if (self.xlt_loss_implementation in ("chunked", "liger") and not kd and not return_outputs
                and "labels" in inputs and self.label_smoother is None and self.compute_loss_func is None
                and self.head_for_loss() is not None):
            loss, by_lang = self._hidden_loss(model, inputs, num_items_in_batch, langs if measure else None)
            if by_lang is not None:
                self.xlt_language_loss.add(*by_lang)
            return loss
        if not measure and not kd:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        logits = getattr(outputs, "logits", None) if not isinstance(outputs, dict) else outputs.get("logits")
        if kd:
            term, acc = kd_loss_term(self.xlt_kd, logits, inputs,
                                     num_items_in_batch if self.model_accepts_loss_kwargs else None,
                                     self._token_average_scale())
            loss = loss + term
            self.xlt_kd_loss.add(acc)
        if measure and logits is not None:
            self.xlt_language_loss.add(*logits_language_sums(logits, inputs["labels"], langs, len(LANGS)))
        return (loss, outputs) if return_outputs else loss

    def _token_average_scale(self) -> Optional[int]:
        """The factor Trainer.compute_loss multiplies a token-normalised loss by when it averages tokens across
        devices (None when it does not)."""
        if not self.args.average_tokens_across_devices:
            return None
        return self.accelerator.num_processes // self.get_tp_size()

    def head_for_loss(self):
        """The output head's projection for the loss from hidden states (xlt/train/losses.py ``head_projection``),
        or None where only the model's logits will do (a peft-wrapped head under FSDP2: those steps use the logits
        path, said once in the log)."""
        if self._head_module is None:
            self._head_module = output_head(self.accelerator.unwrap_model(self.model_wrapped))
            self._projection = head_projection(self._head_module)
            if self._projection is None and self.is_world_process_zero():
                print(f"[xlt cpt] loss: the model's logits ({self.xlt_loss_implementation} needs a plain output "
                      f"head under FSDP2; this one is wrapped by peft)", flush=True)
        return self._projection

    @property
    def loss_implementation_used(self) -> str:
        """The loss implementation the steps really ran ("model" where the head allowed no other)."""
        if self._head_module is not None and self._projection is None:
            return "model"
        return self.xlt_loss_implementation

    def _hidden_loss(self, model, inputs, num_items_in_batch, langs):
        """The LM loss from the last hidden states, normalised as the Trainer's compute_loss normalises the
        model's loss, and (with ``langs``) the per-language sums of the same tokens.

        The wrapped model runs as usual (DDP / FSDP2 hooks fire, the hidden states are one of its outputs) with
        ``logits_to_keep`` an empty index: the head projects no position. The head is then called per chunk.
        """
        labels, shift = inputs["labels"], inputs.get("shift_labels")
        hidden = forward_hidden(model, {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")})
        head, project = self._head_module, self.head_for_loss()
        vocab = int(head.weight.shape[0])
        items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        if self.xlt_loss_implementation == "liger" and type(head) is torch.nn.Linear and head.bias is None:
            loss = liger_causal_lm_loss(hidden, head.weight.to(hidden.dtype), labels, items, shift)
            by_lang = None
            if langs is not None:  # one extra no-grad projection on the measured steps only
                with torch.no_grad():
                    targets = shift_targets(labels, shift).to(hidden.device)
                    ce = per_token_ce(hidden.detach(), project, targets, vocab)
                    by_lang = language_sums(ce, targets, shift_langs(langs), len(LANGS))
        else:  # chunked, or liger on a head it cannot take (a peft wrapper, a bias)
            loss, by_lang = chunked_causal_lm_loss(hidden, project, labels, vocab, items, shift, langs, len(LANGS))
        scale = self._token_average_scale()  # as Trainer.compute_loss scales
        if scale and self.model_accepts_loss_kwargs and items is not None:
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss, by_lang

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(dataset, "index_resume", False):  # shard rows: in order, the curriculum is the order
            return torch.utils.data.SequentialSampler(dataset)
        return super()._get_train_sampler(train_dataset)

    def _get_grad_norm(self, model, grad_norm=None):
        # transformers computes the global (cross-rank) norm here on every optimizer step, clipping or not
        # (max_grad_norm 0: clip_grad_norm_ with max inf). Without it the guard checks the gradients itself.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self._guard_on():
            self.xlt_guard.record_grad_norm(grad_norm, self.state.global_step + 1)
        return grad_norm

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        if "loss" in logs:  # every process: some fields all-reduce
            main = self.is_world_process_zero()
            for cb in self.callback_handler.callbacks:
                if isinstance(cb, LogFields):
                    cb.fill(logs, self.state, main)
        super().log(logs, start_time)
