"""Trainer callbacks: xlt state in every checkpoint, the progress bar's postfix, and the fields of the training log
lines (loss by language, distillation loss, tokens/s, token accounting). The spike guard's own callback lives in
xlt/train/skip_step.py."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Optional

import torch
from transformers import TrainerCallback

from xlt.data.schedule import cumulative_ja_share, ja_ratio, seq_len_at
from xlt.io import atomic_write_json
from xlt.train.checkpoint import STATE_FILE

if TYPE_CHECKING:
    from xlt.train.skip_step import SkipStepGuard


class XltStateCallback(TrainerCallback):
    """Writes ``xlt_state.json`` into a checkpoint: stream position, accounting, guard.

    Called by the trainer inside its checkpoint save (before any old checkpoint is rotated away), not from
    ``on_save``, which runs only after the Trainer has already rotated. The stream is asked for its state
    *at the rows the optimizer consumed*, not its current position, because the dataloader prefetches ahead.
    Writing from rank 0 only is correct for the guard too: it is built from all-reduced values, so every
    rank's state is equal.
    """

    def __init__(self, stream: Any, rows_per_step: int, guard: Optional[SkipStepGuard] = None) -> None:
        self.stream = stream
        self.rows_per_step = rows_per_step
        self.guard = guard

    def write(self, run_dir: str, global_step: int) -> None:
        rows = global_step * self.rows_per_step
        ckpt = os.path.join(run_dir, f"checkpoint-{global_step}")
        payload = {
            "global_step": global_step,
            "rows_consumed": rows,
            "stream": self.stream.state_at(rows),
            "accounting": self.stream.accounting_at(rows),
            "guard": self.guard.state_dict() if self.guard else None,
            "saved_at": time.time(),
        }
        atomic_write_json(os.path.join(ckpt, STATE_FILE), payload)


class ProgressPostfix(TrainerCallback):
    """Puts tokens/s, the Japanese share, the sequence length and skipped steps on the Trainer's progress bar.

    ``handler`` is the trainer's callback handler (set after the trainer is built): the bar belongs to its
    ``ProgressCallback``.
    """

    _KEYS = (("tokens_per_second", "tok/s"), ("ja_share_target", "ja"), ("seq_len", "seq"),
             ("skipped_steps", "skipped"))

    def __init__(self) -> None:
        self.handler: Any = None

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - Trainer's signature
        if not state.is_world_process_zero or not logs or self.handler is None:
            return
        for cb in self.handler.callbacks:
            bar = getattr(cb, "training_bar", None)
            if bar is not None:
                bar.set_postfix({short: logs[k] for k, short in self._KEYS if k in logs}, refresh=False)


class LogFields(TrainerCallback):
    """A callback that adds fields to the training log lines (``loss`` lines only).

    ``CptTrainer.log`` calls ``fill`` on every process, in the order the callbacks were added, before the Trainer
    records the line (so the fields reach ``log_history``, the printed line and every ``on_log``). A field that
    all-reduces must therefore fill on every process; ``main`` says whether this one is the world's process 0.
    """

    def fill(self, logs: dict, state: Any, main: bool) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class LanguageLoss(LogFields):
    """``loss_<lang>``: the mean loss of each language over the tokens measured since the last log line, summed
    over every process (one all-reduce and the log's one host read)."""

    def __init__(self, langs: tuple[str, ...]) -> None:
        self.langs = langs
        self.sums: Optional[list] = None

    def add(self, sums: Any, counts: Any) -> None:
        """Per-language loss sums and token counts of one micro-batch (device tensors: nothing is read back)."""
        if self.sums is None:
            self.sums = [sums.detach().clone(), counts.detach().clone()]
        else:
            self.sums[0] += sums
            self.sums[1] += counts

    def fill(self, logs: dict, state: Any, main: bool) -> None:
        if self.sums is None:
            return
        both = torch.cat(self.sums)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(both)
        values, n = both.tolist(), len(self.langs)
        for i, lang in enumerate(self.langs):
            if values[n + i] > 0:
                logs[f"loss_{lang}"] = round(values[i] / values[n + i], 4)
        self.sums = None


class DistillationLoss(LogFields):
    """``kd_loss``: the mean distillation KL (before ``kd_weight``) over the positions scored since the last log."""

    def __init__(self) -> None:
        self.acc: Any = None  # [summed KL, scored positions], float64 on the device

    def add(self, acc: Any) -> None:
        self.acc = acc if self.acc is None else self.acc + acc

    def fill(self, logs: dict, state: Any, main: bool) -> None:
        if self.acc is None:
            return
        acc = self.acc
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(acc)
        if acc[1] > 0:
            logs["kd_loss"] = round(float(acc[0] / acc[1]), 4)
        self.acc = None


class Throughput(LogFields):
    """``tokens_per_second`` between log lines, from the steps trained (``tokens_per_step`` each); the clock starts
    when training really begins (after a resumed checkpoint's state is loaded)."""

    def __init__(self, tokens_per_step: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.last: Optional[tuple[float, int]] = None

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - Trainer's signature
        self.last = (time.time(), state.global_step)

    def fill(self, logs: dict, state: Any, main: bool) -> None:
        now, step = time.time(), state.global_step
        if self.last is not None and step > self.last[1]:
            dt = max(now - self.last[0], 1e-9)
            logs["tokens_per_second"] = round((step - self.last[1]) * self.tokens_per_step / dt, 1)
        self.last = (now, step)


class TokenAccounting(LogFields):
    """``tokens_trained`` (per language too), the realised Japanese share, the schedule's targets, the sequence
    length and ``skipped_steps`` at the rows the optimizer consumed — on the main process, which holds the
    stream's accounting."""

    def __init__(self, stream: Any, rows_per_step: int, tokens_per_step: int, max_steps: int,
                 data_args: Any = None, guard: Optional[SkipStepGuard] = None) -> None:
        self.stream, self.rows_per_step, self.tokens_per_step = stream, rows_per_step, tokens_per_step
        self.max_steps, self.data_args, self.guard = max_steps, data_args, guard

    def fill(self, logs: dict, state: Any, main: bool) -> None:
        if self.stream is None or not main:
            return
        trained = self.stream.accounting_at(state.global_step * self.rows_per_step).get("tokens_trained", {})
        done = int(sum(trained.values()))
        logs["tokens_trained"] = done or 1
        for lang, n in trained.items():
            logs[f"tokens_trained_{lang}"] = n
        logs["ja_share_cum"] = round(trained.get("ja", 0) / (done or 1), 4)
        if self.data_args is not None:
            total = self.tokens_per_step * self.max_steps
            logs["ja_share_target"] = round(ja_ratio(done, total, self.data_args), 4)
            logs["ja_share_cum_target"] = cumulative_ja_share(done, total, self.data_args)
            logs["seq_len"] = seq_len_at(done, total, self.data_args)
        if self.guard is not None:
            logs["skipped_steps"] = self.guard.skipped
