"""Host syncs per optimizer step: xlt's own code reads a device value back at most twice per step.

On a GPU every read of a tensor's value on the host (``.item()``, ``.tolist()``, ``bool()`` / ``float()`` /
``int()`` of a tensor, ``nonzero``, boolean-mask indexing or ``masked_select``, whose output size depends on the
data) stalls the CPU until the GPU catches up. On the CPU nothing stalls, so the test counts the calls themselves:
a ``TorchFunctionMode`` sees every tensor call made while a real ``XltTrainer`` trains, and a call whose caller is
a file of the ``xlt`` package counts as xlt's. The two allowed: the spike guard's one ``.tolist()`` per optimizer
step (its skip decision needs the all-reduced loss and gradient norm on the host) and, on logging steps, the one
``.tolist()`` of ``loss_<lang>``.
"""

from __future__ import annotations

import collections
import os
import sys

import torch
from torch.overrides import TorchFunctionMode

from conftest import REPO

XLT_DIR = str(REPO / "xlt") + os.sep
READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "masked_select",
         "argwhere", "nonzero_static", "unique"}


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class SyncCounter(TorchFunctionMode):
    """Counts host reads of tensor values by the caller's ``file:function``."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        sync = name in READS or (name in ("__getitem__", "__setitem__") and _bool_index(args))
        if sync:
            frame = sys._getframe(1)
            self.calls[f"{frame.f_code.co_filename}:{frame.f_code.co_name}:{name}"] += 1
        return func(*args, **(kwargs or {}))

    def xlt_calls(self) -> dict:
        return {k[len(XLT_DIR):]: n for k, n in self.calls.items() if k.startswith(XLT_DIR)}


def test_xlt_reads_back_at_most_twice_per_optimizer_step(tmp_path, tiny_model_dir):
    from test_scale import cpt_args

    import xlt.train.cpt as cpt_module
    from xlt.cli import run_recipe

    counter, record = SyncCounter(), {}
    original = cpt_module.CptTrainer

    class Counting(original):
        def train(self, *a, **k):
            record["trainer"] = self
            with counter:
                return super().train(*a, **k)

    cpt_module.CptTrainer = Counting
    try:  # every step measures loss by language and logs; the spike guard judges every step
        assert run_recipe("cpt", cpt_args(tiny_model_dir, str(tmp_path / "run"), "--loss_by_language_steps", "1",
                                          "--logging_steps", "1", "--save_steps", "100", "--skip_step_sigma", "6",
                                          "--spike_factor", "2")) == 0
    finally:
        cpt_module.CptTrainer = original
    trainer = record["trainer"]
    steps = trainer.state.global_step
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert steps == 6 and len(logs) == 6 and all("loss_ja" in h and "loss_en" in h for h in logs)
    assert trainer.xlt_guard.enabled
    xlt = collections.Counter()
    for where, n in counter.xlt_calls().items():
        path, _, op = where.split(":")
        xlt[f"{path}:{op}"] += n
    # The guard's skip decision (every step) and the loss_<lang> log (every logging step): nothing else.
    assert dict(xlt) == {"train/skip_step.py:tolist": steps, "train/callbacks.py:tolist": steps}, counter.xlt_calls()
    assert sum(xlt.values()) <= 2 * steps
