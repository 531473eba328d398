"""Trainer callbacks and guards: loss-spike skipping, xlt state in every checkpoint, progress."""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any, Optional

from transformers import TrainerCallback

from xlt.train.checkpoint import STATE_FILE, atomic_write_json


class SpikeGuard:
    """Skip the optimizer update of a step whose loss jumps above ``factor`` x the recent mean.

    Gradient clipping bounds the update's size but not its direction; a batch that spikes the
    loss (bad data, an fp overflow) still pushes the weights the wrong way. We drop that update:
    the optimizer's ``step`` is wrapped so the skipped step leaves weights and Adam moments alone.
    """

    def __init__(self, factor: float, window: int = 50, min_history: int = 10) -> None:
        self.factor = factor
        self.history: deque[float] = deque(maxlen=window)
        self.min_history = min_history
        self.skip_now = False
        self.skipped = 0
        self._step_losses: list[float] = []

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    def observe(self, loss: float) -> None:
        """Record one micro-batch loss of the current optimizer step."""
        self._step_losses.append(loss)

    def decide(self) -> bool:
        """At the optimizer step: True to skip it. Spiking steps do not enter the running mean."""
        loss = sum(self._step_losses) / max(1, len(self._step_losses))
        self._step_losses = []
        spike = (
            self.enabled
            and len(self.history) >= self.min_history
            and (loss != loss or loss > self.factor * (sum(self.history) / len(self.history)))  # NaN too
        )
        if spike:
            self.skipped += 1
        else:
            self.history.append(loss)
        return spike

    def wrap(self, optimizer: Any) -> None:
        original_step = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            if self.decide():
                optimizer.zero_grad(set_to_none=True)
                return None
            return original_step(*args, **kwargs)

        optimizer.step = step

    def state_dict(self) -> dict:
        return {"history": list(self.history), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.history.extend(state.get("history", []))
        self.skipped = int(state.get("skipped", 0))


class XltStateCallback(TrainerCallback):
    """Writes ``xlt_state.json`` into a checkpoint: stream position, accounting, guard.

    Called by the trainer inside its checkpoint save (before any old checkpoint is rotated away), not from
    ``on_save``, which runs only after the Trainer has already rotated. The stream is asked for its state
    *at the rows the optimizer consumed*, not its current position, because the dataloader prefetches ahead.
    """

    def __init__(self, stream: Any, rows_per_step: int, guard: Optional[SpikeGuard] = None) -> None:
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
