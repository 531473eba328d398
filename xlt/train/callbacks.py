"""Trainer callbacks: xlt state in every checkpoint (the spike guard itself lives in xlt/train/skip_step.py)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Optional

from transformers import TrainerCallback

from xlt.train.checkpoint import STATE_FILE, atomic_write_json

if TYPE_CHECKING:
    from xlt.train.skip_step import SkipStepGuard


class XltStateCallback(TrainerCallback):
    """Write ``xlt_state.json`` into each checkpoint: stream position, accounting, guard.

    The stream is asked for its state *at the rows the optimizer consumed*, not its current
    position, because the dataloader prefetches ahead of the trainer. Writing from rank 0 only is
    correct for the guard too: it is built from all-reduced values, so every rank's state is equal.
    """

    def __init__(self, stream: Any, rows_per_step: int, guard: Optional[SkipStepGuard] = None) -> None:
        self.stream = stream
        self.rows_per_step = rows_per_step
        self.guard = guard

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001 - Trainer's signature
        if not state.is_world_process_zero:
            return
        rows = state.global_step * self.rows_per_step
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        payload = {
            "global_step": state.global_step,
            "rows_consumed": rows,
            "stream": self.stream.state_at(rows),
            "accounting": self.stream.accounting_at(rows),
            "guard": self.guard.state_dict() if self.guard else None,
            "saved_at": time.time(),
        }
        atomic_write_json(os.path.join(ckpt, STATE_FILE), payload)
