"""Trainer callbacks: xlt state in every checkpoint (the spike guard itself lives in xlt/train/skip_step.py)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Optional

from transformers import TrainerCallback

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


class OnTrainBegin(TrainerCallback):
    """Calls ``fn()`` when training really begins: after a resumed checkpoint's state is loaded."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - Trainer's signature
        self.fn()
