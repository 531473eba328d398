"""Optimisation of the new embedding rows of an extended (or swapped) tokenizer.

Three recipe keys (``CptArguments``): ``new_rows_lr_multiplier``, ``new_rows_weight_decay`` and
``new_rows_warmup_fraction``. Their meaning is that of a reference AdamW run in which the new rows (input
embedding and, when untied, output head) are a separate parameter group with ``lr * multiplier`` and
``weight_decay = new_rows_weight_decay``, and in which, for the first ``ceil(fraction * max_steps)`` optimizer
steps, every other parameter (the body and every old row) is frozen: not updated, no weight decay, and its Adam
state does not advance, so its first real step is a normal first Adam step.

Why a wrapper and not a real torch param group: the new rows live inside the same ``V x d`` matrix as the old
ones. Splitting them into their own ``Parameter`` would change the model's modules, its tying, its state-dict
keys, the FSDP2 sharding and every checkpoint. Instead ``NewRowsOptimizer`` wraps the torch AdamW and, after
its step, rewrites only the new rows with the update their own group would have made. That is exact: AdamW's
moments are per element and their update does not depend on the LR or the weight decay, so the new rows'
``exp_avg`` / ``exp_avg_sq`` that the inner AdamW keeps are exactly the separate group's; only the decay, the
step size and the bias-correction step count (kept per parameter by torch, so kept here for the new rows under
the key ``xlt_new_rows_step`` of the parameter's optimizer state, which checkpoints and resumes with it) differ,
and those are recomputed with torch's own formula from the pre-step rows. The rows are indexed on the local
shard, so FSDP2 (dim-0 sharded DTensors) and DDP (identical replicas) work alike; every decision is made from
the Trainer's ``global_step``, the same on every rank and restored on resume.

The wrapper sits *inside* ``SkipStepOptimizer``: a skipped step never reaches it, so nothing moves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from xlt.config import XltError
from xlt.log import logger
from xlt.train.optim_wrap import DelegatingOptimizer

COUNT_KEY = "xlt_new_rows_step"  # new rows' Adam step count, in the optimizer state of each embedding matrix
SUPPORTED_OPTIM = ("adamw_torch", "adamw_torch_fused")


_log = logger("xlt cpt")


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@dataclass(frozen=True)
class NewRowsSettings:
    """The new-row treatment of one run (``warmup_steps`` already in optimizer steps)."""

    lr_multiplier: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    active: bool = True  # False: the new rows step with the base group (nothing differs, or no AdamW)

    def describe(self, count: int, max_steps: int) -> str:
        warm = (f"new-rows-only warm-up for {self.warmup_steps} of {max_steps} steps (body and old rows frozen)"
                if self.warmup_steps else "no warm-up")
        if not self.active:
            return f"new rows: {count}; they train with the base parameter group"
        return (f"new rows: {count} (input and untied output rows); lr x{self.lr_multiplier:g}, "
                f"weight decay {self.weight_decay:g}; {warm}")

    def report(self, count: int) -> dict:
        return {"count": count, "lr_multiplier": self.lr_multiplier, "weight_decay": self.weight_decay,
                "warmup_steps": self.warmup_steps, "own_group": self.active}


def _optim_name(training_args: Any) -> str:
    optim = getattr(training_args, "optim", "adamw_torch")
    return str(getattr(optim, "value", optim))


def new_rows_settings(cpt_args: Any, tokenizer_mode: str, training_args: Any, max_steps: int,
                      use_lora: bool = False) -> Optional[NewRowsSettings]:
    """The treatment of the new rows (``active`` False: they step with the base group), or None without a
    tokenizer change or with LoRA; one-line errors.

    Runs before any model loads. The keys need a tokenizer change; LoRA (whose new rows are peft's own small
    parameters) and optimizers other than torch's AdamW are refused when a key is not at its default. At their
    defaults with AdamW the new rows still get their own weight decay (0 unless set) when the base group decays.
    """
    m, wd, frac = cpt_args.new_rows_lr_multiplier, cpt_args.new_rows_weight_decay, cpt_args.new_rows_warmup_fraction
    custom = [k for k, v, d in (("new_rows_lr_multiplier", m, 1.0), ("new_rows_weight_decay", wd, 0.0),
                                ("new_rows_warmup_fraction", frac, 0.0)) if v != d]
    if tokenizer_mode == "none":
        if custom:
            raise XltError(f"{custom[0]}={getattr(cpt_args, custom[0])}: needs a tokenizer change "
                           f"(tokenizer_mode extend or swap); with tokenizer_mode none there are no new rows")
        return None
    if use_lora:
        if custom:
            raise XltError(f"{custom[0]} is not supported with use_lora (peft trains the new rows, see "
                           f"lora_new_rows): remove it or set use_lora false")
        return None
    warmup = math.ceil(frac * max_steps) if frac > 0 else 0
    if warmup and warmup >= max_steps:
        raise XltError(f"new_rows_warmup_fraction={frac}: the warm-up takes {warmup} of the run's {max_steps} steps, "
                       f"leaving none for the body")
    base_wd = float(getattr(training_args, "weight_decay", 0.0) or 0.0)
    if m == 1.0 and warmup == 0 and wd == base_wd:
        return NewRowsSettings(float(m), float(wd), warmup, active=False)
    optim = _optim_name(training_args)
    if optim not in SUPPORTED_OPTIM:
        if custom:
            raise XltError(f"{custom[0]} needs optim adamw_torch or adamw_torch_fused, got optim {optim}")
        _log(f"new rows: optim {optim} has no per-row treatment; they decay with the base group "
             f"(weight_decay {base_wd:g})")
        return NewRowsSettings(1.0, base_wd, 0, active=False)
    return NewRowsSettings(lr_multiplier=float(m), weight_decay=float(wd), warmup_steps=warmup)


def embedding_matrices(model: Any) -> list[torch.nn.Parameter]:
    """The input embedding and, when not tied to it, the output head weight (each once)."""
    out: list[torch.nn.Parameter] = []
    for mod in (model.get_input_embeddings(), model.get_output_embeddings()):
        w = getattr(mod, "weight", None) if mod is not None else None
        if w is not None and w.requires_grad and all(w is not o for o in out):
            out.append(w)
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor (a view that in-place writes go through), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _local_rows(p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (global row ids) that this process holds, as indices into its local shard."""
    if not hasattr(p, "device_mesh"):
        return rows
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(pl.is_shard() and pl.dim != 0 for pl in p.placements):
        raise XltError(f"new rows: the embedding is sharded as {p.placements}; only row (dim 0) sharding is supported")
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    lo, n = int(offset[0]), int(shape[0])
    return rows[(rows >= lo) & (rows < lo + n)] - lo


class NewRowsOptimizer(DelegatingOptimizer):
    """Wrap a torch AdamW so the new rows step as their own group, and the rest may be frozen for a warm-up.

    Guarantees (see the module docstring for why they are exact):

    * a step taken after ``arm()`` (the trainer arms it in each training step) at ``step_of() >= warmup_steps``:
      every parameter but the new rows gets exactly the inner AdamW's update; the new rows get the update of a
      separate AdamW group with ``lr * lr_multiplier`` and ``weight_decay`` (same betas and eps);
    * at ``step_of() < warmup_steps``: every parameter but the new rows is bit-identical before and after, and its
      Adam state (moments and step count) does not change; the new rows step as above;
    * an unarmed ``step()`` (e.g. torch's distributed-checkpoint helper creating the state before loading it)
      passes straight through to the inner optimizer.

    Like ``SkipStepOptimizer`` (``DelegatingOptimizer``) it shares the inner optimizer's ``state``, ``param_groups`` and ``defaults``, so
    LR schedulers and checkpoints see the real optimizer; the new rows' step count is part of that state.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, rows: dict[torch.Tensor, torch.Tensor],  # noqa: D107
                 settings: NewRowsSettings, step_of: Callable[[], int]) -> None:
        if not isinstance(optimizer, torch.optim.AdamW):
            raise XltError(f"new_rows_* keys need torch's AdamW (optim adamw_torch or adamw_torch_fused), "
                           f"got {type(optimizer).__name__}")
        for g in optimizer.param_groups:
            if g.get("amsgrad") or g.get("maximize"):
                raise XltError("new_rows_* keys do not support AdamW with amsgrad or maximize")
        self.optimizer, self.settings, self.step_of = optimizer, settings, step_of
        # Each embedding matrix by its place in the param groups, not by the tensor: accelerate's FSDP2 prepare
        # swaps the optimizer's parameters for their sharded DTensors after this wrapper is built.
        where = {p: (gi, i) for gi, g in enumerate(optimizer.param_groups) for i, q in enumerate(g["params"])
                 for p in rows if q is p}
        if len(where) != len(rows):
            raise XltError("new rows: the embedding matrix is not among the optimizer's parameters")
        self._places = [(where[p], idx) for p, idx in rows.items()]
        self._resolved: Optional[tuple[tuple, dict]] = None
        self._armed = False
        self._announced = False

    @property
    def rows(self) -> dict[torch.Tensor, torch.Tensor]:
        """Each embedding matrix as the optimizer holds it now, with its new rows as indices into its local shard."""
        params = tuple(self.optimizer.param_groups[gi]["params"][i] for (gi, i), _ in self._places)
        if self._resolved is None or any(a is not b for a, b in zip(self._resolved[0], params)):
            local = {p: _local_rows(p, idx.to(_local(p).device)) for p, (_, idx) in zip(params, self._places)}
            self._resolved = (params, local)
        return self._resolved[1]

    def _group(self, p: torch.Tensor) -> dict:
        return next(self.optimizer.param_groups[gi] for (gi, i), _ in self._places
                    if self.optimizer.param_groups[gi]["params"][i] is p)

    # -- the step ------------------------------------------------------------------------------
    def arm(self) -> None:
        """Mark the next ``step()`` as a training step (called by the trainer for every micro-batch)."""
        self._armed = True

    def step(self, closure: Optional[Callable[[], float]] = None) -> Any:
        """Step the inner AdamW, then give the new rows their own group's update (see the class guarantees)."""
        if not self._armed:
            return self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self._armed = False
        step = self.step_of()
        warm = step < self.settings.warmup_steps
        if not warm and self.settings.warmup_steps and not self._announced:
            self._announced = True
            if step == self.settings.warmup_steps and _is_main_process():
                _log(f"new-rows warm-up done after {step} steps: the body and the old rows train from step {step + 1}")
        with torch.no_grad():
            before = {p: (_local(p)[idx].clone(), self._count(p)) for p, idx in self.rows.items()}
            result = self._warm_step(closure) if warm else \
                (self.optimizer.step(closure) if closure is not None else self.optimizer.step())
            for p, (old, count) in before.items():
                self._set_new_rows(p, old, count + 1)
        return result

    def _count(self, p: torch.Tensor) -> int:
        """Adam steps the new rows of ``p`` have taken (the parameter's own count until the first warm-up)."""
        st = self.optimizer.state.get(p) or {}
        if COUNT_KEY in st:
            return int(st[COUNT_KEY])
        return int(float(st["step"])) if "step" in st else 0

    def _set_new_rows(self, p: torch.Tensor, old: torch.Tensor, count: int) -> None:
        """Write ``p``'s new rows as a separate AdamW group would: torch's single-tensor formula, from ``old``."""
        group, st = self._group(p), self.optimizer.state[p]
        idx = self.rows[p]
        lr = float(group["lr"]) * self.settings.lr_multiplier
        beta1, beta2 = (float(b) for b in group["betas"])
        exp_avg, exp_avg_sq = _local(st["exp_avg"])[idx], _local(st["exp_avg_sq"])[idx]
        new = old
        if self.settings.weight_decay:
            new.mul_(1 - lr * self.settings.weight_decay)
        bias_correction1 = 1 - beta1 ** count
        bias_correction2_sqrt = (1 - beta2 ** count) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(float(group["eps"]))
        new.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        _local(p).index_copy_(0, idx, new)
        st[COUNT_KEY] = count

    def _init_state(self) -> None:
        """Create the Adam state of every parameter that has none, moments and step count at zero.

        torch's own initialisation, as its distributed-checkpoint helper does it: one inner step with zero
        gradients and LR 0 (weights bit-identical: a zero update and no decay), then the step counts set back
        to 0. Frozen parameters then keep a zero state through the warm-up, which checkpoints like any other.
        """
        groups = self.optimizer.param_groups
        missing = [p for g in groups for p in g["params"] if not self.optimizer.state.get(p)]
        if not missing:
            return
        grads = {p: p.grad for g in groups for p in g["params"]}
        lrs = [g["lr"] for g in groups]
        try:
            for p in grads:
                p.grad = None
            for p in missing:
                p.grad = torch.zeros_like(p)
            for g in groups:
                g["lr"] = 0.0
            self.optimizer.step()
        finally:
            for g, lr in zip(groups, lrs):
                g["lr"] = lr
            for p, grad in grads.items():
                p.grad = grad
        for p in missing:
            self.optimizer.state[p]["step"].zero_()

    def _warm_step(self, closure: Optional[Callable[[], float]]) -> Any:
        """An inner step that moves only the new rows' moments: every other gradient is dropped (old rows: zeroed,
        so their zero moments stay zero and their update is exactly 0), no group decays, and the embedding
        matrices' step counts (the old rows') are put back. The new rows are then set by ``_set_new_rows``."""
        self._init_state()
        groups = self.optimizer.param_groups
        grads = {p: p.grad for g in groups for p in g["params"]}
        decays = [g["weight_decay"] for g in groups]
        rows = self.rows
        steps = {p: self.optimizer.state[p]["step"].clone() for p in rows}
        try:
            for p in grads:
                if p not in rows:
                    p.grad = None
                elif p.grad is not None:  # in place: the old rows' gradient of this step is dropped
                    g_local, idx = _local(p.grad), rows[p]
                    keep = g_local[idx].clone()
                    g_local.zero_().index_copy_(0, idx, keep)
            for g in groups:
                g["weight_decay"] = 0.0
            return self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        finally:
            for g, wd in zip(groups, decays):
                g["weight_decay"] = wd
            for p, grad in grads.items():
                p.grad = grad
            for p, s in steps.items():
                self.optimizer.state[p]["step"].copy_(s)


def wrap_new_rows(optimizer: torch.optim.Optimizer, model: Any, new_ids: list[int], settings: NewRowsSettings,
                  step_of: Callable[[], int]) -> NewRowsOptimizer:
    """``optimizer`` wrapped so that rows ``new_ids`` of the embedding (and untied head) follow ``settings``."""
    mats = embedding_matrices(model)
    if not mats:
        raise XltError("new rows: the model has no trainable input embedding")
    rows = {}
    for w in mats:
        if new_ids and max(new_ids) >= w.shape[0]:
            raise XltError(f"new rows: id {max(new_ids)} is outside the embedding ({w.shape[0]} rows)")
        rows[w] = torch.tensor(sorted(set(new_ids)), dtype=torch.long)
    return NewRowsOptimizer(optimizer, rows, settings, step_of)
