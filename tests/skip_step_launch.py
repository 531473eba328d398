"""Launched by tests/test_skip_step.py under ``accelerate launch`` (2 gloo CPU processes): the real CPT path
with a bad micro-batch injected on rank 1 ONLY, and each rank's weights / optimizer state dumped around it.

    python skip_step_launch.py DUMP_DIR EVENTS [cpt recipe args ...]

EVENTS: comma-separated ``STEP:KIND`` (KIND ``spike`` = loss x 1e4, ``nan`` = loss x NaN) or ``STEP+:KIND`` for
every step from STEP on. For each single-step event the script writes ``DUMP_DIR/{before,after}_step{S}_rank{R}.pt``
(parameters and optimizer state just before and just after that optimizer step; under FSDP2 the rank's shards); at every save
``guard_step{N}_rank{R}.json`` (the rank's own guard state); at exit ``rc_rank{R}.txt`` (run_recipe's status).
Only xlt APIs that predate the skip-step guard are used, so the script also runs against the old code.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import TrainerCallback

import xlt.train.cpt as cpt_module
from xlt.cli import run_recipe


def parse_events(spec: str) -> tuple[dict[int, str], tuple[int, str] | None]:
    single, onward = {}, None
    for item in filter(None, spec.split(",")):
        step, kind = item.split(":")
        if step.endswith("+"):
            onward = (int(step[:-1]), kind)
        else:
            single[int(step)] = kind
    return single, onward


def _local(t: torch.Tensor) -> torch.Tensor:
    """A copy of this rank's part: its shard of an FSDP2 DTensor, else the tensor."""
    return (t.to_local() if hasattr(t, "to_local") else t).clone()


def main() -> int:
    dump, spec, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    os.makedirs(dump, exist_ok=True)
    single, onward = parse_events(spec)
    rank = int(os.environ.get("RANK", "0"))

    def event(step: int) -> str | None:
        if step in single:
            return single[step]
        return onward[1] if onward and step >= onward[0] else None

    class Dump(TrainerCallback):
        def _write(self, name: str, model, optimizer) -> None:  # noqa: ANN001
            opt_state = {k: {n: (_local(v) if torch.is_tensor(v) else v) for n, v in s.items()}
                         for k, s in optimizer.state_dict()["state"].items()}
            params = {n: _local(p.detach()) for n, p in model.named_parameters()}
            torch.save({"params": params, "optimizer": opt_state}, os.path.join(dump, f"{name}_rank{rank}.pt"))

        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):  # noqa: ANN001
            if state.global_step + 1 in single:
                self._write(f"before_step{state.global_step + 1}", model, optimizer)

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):  # noqa: ANN001
            if state.global_step in single:
                self._write(f"after_step{state.global_step}", model, optimizer)

    original = cpt_module.CptTrainer

    class Injected(original):
        def __init__(self, *a, **k):
            k["callbacks"] = list(k.get("callbacks") or []) + [Dump(), SaveGuard(self)]
            super().__init__(*a, **k)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            kind = event(self.state.global_step + 1) if model.training else None
            if kind and self.accelerator.process_index == 1:
                factor = 1e4 if kind == "spike" else float("nan")
                out = (out[0] * factor, *out[1:]) if return_outputs else out * factor
            return out

    class SaveGuard(TrainerCallback):
        def __init__(self, trainer) -> None:  # noqa: ANN001
            self.trainer = trainer

        def on_save(self, args, state, control, **kw):  # noqa: ANN001
            guard = self.trainer.xlt_guard
            with open(os.path.join(dump, f"guard_step{state.global_step}_rank{rank}.json"), "w") as f:
                json.dump(guard.state_dict() if guard is not None else None, f)

    cpt_module.CptTrainer = Injected
    rc = run_recipe("cpt", argv)
    with open(os.path.join(dump, f"rc_rank{rank}.txt"), "w") as f:
        f.write(str(rc))
    if torch.distributed.is_initialized():  # so the launcher does not stop a rank before it wrote its status
        torch.distributed.barrier()
    return rc


if __name__ == "__main__":
    sys.exit(main())
