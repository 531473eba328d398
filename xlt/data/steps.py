"""The tokens-per-step arithmetic of a streamed pretraining run (pure; no model, no data)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from xlt.config import CptArguments, DataArguments, XltError


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
