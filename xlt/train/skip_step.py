"""Skip-step guard: drop the optimizer update of a step whose loss or gradient norm spikes.

Gradient clipping bounds an update's size but not its direction; a batch that spikes the loss
(bad data, an fp overflow) still pushes the weights the wrong way. The guard drops that update.
Modelled on OLMo-core's skip-step optimizer, adapted to the Trainer:

* ``SkipStepOptimizer`` wraps the raw torch optimizer (before accelerate wraps it). At each
  optimizer step it makes ONE all-reduce of ``[loss sum, micro-batch count, non-finite flag,
  grad norm]`` (``torch.distributed`` when initialised, else nothing), so every rank judges the
  same numbers and takes the same decision: replicas (DDP) and shards (FSDP) never diverge.
* ``SkipStepGuard`` holds the rule and its state. Micro-batch losses are summed as detached
  device tensors (no host sync until the step's one all-reduce); the grad norm is the one the
  Trainer's clipper already reduced across ranks.
* A skipped step leaves the weights and the optimizer state (Adam moments, step count) untouched
  and never enters the history; a non-finite loss or gradient is always skipped (when
  ``skip_nonfinite``), even before the history is long enough for the z-score rule.

The LR schedule and the Trainer's step count go on through a skipped step (the schedule follows steps, as
in OLMo-core). Not under DeepSpeed: its engine owns the step and the clipping (see ``check_backend``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from xlt.config import CptArguments, XltError
from xlt.log import logger
from xlt.train.optim_wrap import DelegatingOptimizer

_log = logger("xlt cpt")


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@dataclass
class SkipStepConfig:
    """The rule, from the recipe keys of ``CptArguments`` (see their help in xlt/config.py; their defaults)."""

    sigma: float = CptArguments.skip_step_sigma
    window: int = CptArguments.skip_step_window
    min_history: int = CptArguments.skip_step_min_history
    max_consecutive: int = CptArguments.max_consecutive_skips
    skip_nonfinite: bool = CptArguments.skip_nonfinite
    spike_factor: float = CptArguments.spike_factor

    @classmethod
    def from_args(cls, cpt_args: Any) -> SkipStepConfig:
        return cls(sigma=cpt_args.skip_step_sigma, window=cpt_args.skip_step_window,
                   min_history=cpt_args.skip_step_min_history, max_consecutive=cpt_args.max_consecutive_skips,
                   skip_nonfinite=cpt_args.skip_nonfinite, spike_factor=cpt_args.spike_factor)

    @property
    def enabled(self) -> bool:
        """False when no rule can skip a step: then no wrapper, no loss recording, no collective."""
        return self.sigma > 0 or self.spike_factor > 0 or self.skip_nonfinite


@dataclass
class SkipStepState:
    """What ``xlt_state.json`` keeps of the guard. Built only from all-reduced values, so every rank's is equal."""

    loss_history: list[float] = field(default_factory=list)
    grad_norm_history: list[float] = field(default_factory=list)
    skipped: int = 0
    consecutive: int = 0
    last_skip: Optional[dict] = None  # {"step": int, "reason": str} of the latest skipped step

    def to_dict(self) -> dict:
        return {"loss_history": list(self.loss_history), "grad_norm_history": list(self.grad_norm_history),
                "skipped": self.skipped, "consecutive": self.consecutive, "last_skip": self.last_skip}

    @classmethod
    def from_dict(cls, d: dict) -> SkipStepState:
        """Read a saved state; also the old SpikeGuard form ``{"history": [...], "skipped": n}``."""
        return cls(loss_history=[float(x) for x in d.get("loss_history", d.get("history", []))],
                   grad_norm_history=[float(x) for x in d.get("grad_norm_history", [])],
                   skipped=int(d.get("skipped", 0)), consecutive=int(d.get("consecutive", 0)),
                   last_skip=d.get("last_skip"))


@dataclass
class StepVerdict:
    """The decision on one optimizer step (identical on every rank)."""

    step: int
    skip: bool
    loss: float
    grad_norm: Optional[float]
    reason: str = ""  # names the value and the threshold it crossed


def _mean_std(xs: deque[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / max(1, n - 1)
    return mean, math.sqrt(var)


class SkipStepGuard:
    """The skip rule and its state; fed by the trainer, consulted by ``SkipStepOptimizer.step``.

    Guarantees: ``decide`` is a pure function of the config, the state and its (all-reduced)
    arguments, so the same on every rank; skipped steps and non-finite values never enter the
    history; the history holds at most ``window`` steps.
    """

    def __init__(self, config: SkipStepConfig) -> None:
        self.config = config
        self.losses: deque[float] = deque(maxlen=max(2, config.window))
        self.grad_norms: deque[float] = deque(maxlen=max(2, config.window))
        self.skipped = 0
        self.consecutive = 0
        self.last_skip: Optional[dict] = None
        self.decisions = 0  # steps judged in this process (the step number when the trainer gives none)
        self.current_step: Optional[int] = None  # the optimizer step being accumulated (set by the trainer)
        self._acc_step: Optional[int] = None
        self._loss_sum: Optional[torch.Tensor] = None
        self._count = 0
        self._grad_norm: Optional[torch.Tensor] = None

    @classmethod
    def from_args(cls, cpt_args: Any) -> SkipStepGuard:
        return cls(SkipStepConfig.from_args(cpt_args))

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @property
    def stop_requested(self) -> bool:
        """True after ``max_consecutive`` skips in a row (0: never)."""
        return 0 < self.config.max_consecutive <= self.consecutive

    # -- inputs of the current step (no host sync) ---------------------------------------------
    def _at(self, step: Optional[int]) -> None:
        """Start a fresh accumulation when ``step`` is a new optimizer step (e.g. after a step an fp16 scaler
        dropped without calling the optimizer, whose inputs must not leak into the next one)."""
        if step is not None:
            self.current_step = step
        if self.current_step != self._acc_step:
            self._acc_step = self.current_step
            self._loss_sum, self._count, self._grad_norm = None, 0, None

    def record_loss(self, loss: torch.Tensor, step: Optional[int] = None) -> None:
        """Add one micro-batch loss (a tensor; summed on its device, detached, never read back here)."""
        self._at(step)
        loss = loss.detach().to(torch.float64).reshape(())
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._count += 1

    def has_pending_step(self) -> bool:
        """True when a training step has recorded a loss or a grad norm since the last decision."""
        return self._count > 0 or self._grad_norm is not None

    def record_grad_norm(self, norm: Any, step: Optional[int] = None) -> None:
        """The step's global grad norm, as the clipper returned it (a tensor already reduced across ranks)."""
        self._at(step)
        if norm is not None:
            if hasattr(norm, "full_tensor"):  # FSDP2 returns the norm as a DTensor; its full value is the global norm
                norm = norm.full_tensor()
            self._grad_norm = torch.as_tensor(norm).detach().to(torch.float64).reshape(())

    # -- the decision ------------------------------------------------------------------------
    def reduce_step_inputs(self, params: list[torch.Tensor]) -> tuple[float, Optional[float], bool]:
        """ONE all-reduce of ``[loss sum, count, non-finite flag, grad norm]``; returns (mean loss, grad norm,
        non-finite), identical on every rank. Without a captured grad norm the gradients are checked for
        non-finite values locally and the flag is OR-ed across ranks by the same all-reduce."""
        import torch.distributed as dist

        self._at(None)
        device = self._loss_sum.device if self._loss_sum is not None else \
            (params[0].device if params else torch.device("cpu"))
        zero = torch.zeros((), dtype=torch.float64, device=device)
        loss_sum = self._loss_sum if self._loss_sum is not None else zero
        has_norm = self._grad_norm is not None
        norm = self._grad_norm.to(device) if has_norm else zero
        bad = ~torch.isfinite(loss_sum) | ~torch.isfinite(norm)
        if not has_norm:
            bad = bad | _grads_nonfinite(params, device)
        packed = torch.stack([loss_sum, torch.tensor(float(self._count), dtype=torch.float64, device=device),
                              bad.to(torch.float64), norm])
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            world = dist.get_world_size()
        total, count, flag, norm_sum = packed.tolist()  # the step's one host sync
        self._loss_sum, self._count, self._grad_norm, self._acc_step = None, 0, None, None
        mean = total / count if count else float("nan")
        grad_norm = norm_sum / world if has_norm else None  # every rank holds the same reduced norm
        nonfinite = flag > 0 or not math.isfinite(mean) or (grad_norm is not None and not math.isfinite(grad_norm))
        return mean, grad_norm, nonfinite

    def _reason(self, loss: float, grad_norm: Optional[float], nonfinite: bool) -> str:
        """Why this step must be skipped ('' to take it): value, threshold and rule."""
        cfg = self.config
        if nonfinite:
            return f"non-finite loss {loss:.6g} / grad_norm {grad_norm}" if cfg.skip_nonfinite else ""
        n = len(self.losses)
        if n < cfg.min_history:
            return ""
        if cfg.sigma > 0:
            mean, std = _mean_std(self.losses)
            if loss > mean + cfg.sigma * std:
                return (f"loss {loss:.6g} > threshold {mean + cfg.sigma * std:.6g} "
                        f"(mean {mean:.6g} + {cfg.sigma:g} sigma {std:.3g} over {n} steps)")
            if grad_norm is not None and len(self.grad_norms) >= cfg.min_history:
                gmean, gstd = _mean_std(self.grad_norms)
                if grad_norm > gmean + cfg.sigma * gstd:
                    return (f"grad_norm {grad_norm:.6g} > threshold {gmean + cfg.sigma * gstd:.6g} "
                            f"(mean {gmean:.6g} + {cfg.sigma:g} sigma {gstd:.3g} over {len(self.grad_norms)} steps)")
        if cfg.spike_factor > 0:
            mean = sum(self.losses) / n
            if loss > cfg.spike_factor * mean:
                return (f"loss {loss:.6g} > threshold {cfg.spike_factor * mean:.6g} "
                        f"(spike_factor {cfg.spike_factor:g} x mean {mean:.6g} over {n} steps)")
        return ""

    def decide(self, loss: float, grad_norm: Optional[float], nonfinite: bool, step: Optional[int] = None) -> StepVerdict:
        """Judge one step on all-reduced values and update the state; logs a skip (main process, one line)."""
        self.decisions += 1
        step = step if step is not None else (self.current_step if self.current_step is not None else self.decisions)
        reason = self._reason(loss, grad_norm, nonfinite)
        if reason:
            self.skipped += 1
            self.consecutive += 1
            self.last_skip = {"step": step, "reason": reason}
            if _is_main_process():
                _log(f"step {step} skipped: {reason} [{self.consecutive} in a row, {self.skipped} in all]")
        else:
            self.consecutive = 0
            if not nonfinite:  # a non-finite step taken on purpose (skip_nonfinite false) must not poison the stats
                self.losses.append(loss)
                if grad_norm is not None:
                    self.grad_norms.append(grad_norm)
        return StepVerdict(step, bool(reason), loss, grad_norm, reason)

    def stop_message(self, output_dir: str, step: int) -> str:
        """The one line a run stopped by ``max_consecutive`` skips ends with."""
        last = self.last_skip or {}
        return (f"training stopped at step {step}: {self.consecutive} consecutive steps skipped by the spike guard "
                f"(max_consecutive_skips={self.config.max_consecutive}; last: {last.get('reason', '?')}); "
                f"checkpoint saved in {output_dir}/checkpoint-{step}")

    # -- state ---------------------------------------------------------------------------------
    @property
    def state(self) -> SkipStepState:
        return SkipStepState(list(self.losses), list(self.grad_norms), self.skipped, self.consecutive, self.last_skip)

    def state_dict(self) -> dict:
        return self.state.to_dict()

    def load_state_dict(self, d: dict) -> None:
        s = SkipStepState.from_dict(d)
        self.losses.clear()
        self.losses.extend(s.loss_history)
        self.grad_norms.clear()
        self.grad_norms.extend(s.grad_norm_history)
        self.skipped, self.consecutive, self.last_skip = s.skipped, s.consecutive, s.last_skip


def _grads_nonfinite(params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A 0-d bool tensor: does any local gradient (shard) hold inf / NaN? No host sync."""
    flags = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        g = g.to_local() if hasattr(g, "to_local") else g  # an FSDP2 DTensor shard
        flags.append((~torch.isfinite(g)).any().to(device))
    return torch.stack(flags).any() if flags else torch.zeros((), dtype=torch.bool, device=device)


class SkipStepOptimizer(DelegatingOptimizer):
    """Wrap a torch optimizer so that ``step`` asks the guard first and does nothing for a skipped step.

    Shares the inner optimizer's state (``DelegatingOptimizer``), so checkpoints, LR schedulers and gradient
    scalers see the real optimizer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, guard: SkipStepGuard) -> None:  # noqa: D107
        # No super().__init__: the inner optimizer owns the parameters and their state.
        self.optimizer = optimizer
        self.guard = guard
        self.last_verdict: Optional[StepVerdict] = None

    def step(self, closure: Optional[Callable[[], float]] = None) -> Any:
        """All ranks: reduce, decide, then step the inner optimizer or leave weights and state untouched.

        A step with nothing recorded (no micro-batch loss, no grad norm) is not a training step: torch's
        distributed-checkpoint helpers call ``step()`` with zero grads and LR 0 to create the optimizer state
        before loading it (FSDP2 resume). It passes straight through, on every rank alike (no collective), so
        the Adam moments are restored and no skip is counted.
        """
        if not self.guard.has_pending_step():
            return self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        loss, grad_norm, nonfinite = self.guard.reduce_step_inputs(params)
        self.last_verdict = self.guard.decide(loss, grad_norm, nonfinite)
        if self.last_verdict.skip:
            return None
        return self.optimizer.step(closure) if closure is not None else self.optimizer.step()


class SkipStepCallback(TrainerCallback):
    """After ``max_consecutive_skips`` skips in a row: save a checkpoint and stop (``run_cpt`` then raises)."""

    def __init__(self, guard: SkipStepGuard) -> None:
        self.guard = guard

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - Trainer's signature
        if self.guard.stop_requested:
            control.should_save = True
            control.should_training_stop = True
        return control


def check_backend(trainer: Any, guard: Optional[SkipStepGuard]) -> None:
    """Refuse DeepSpeed with the guard on: its engine steps and clips itself, the guard would judge the wrong batch."""
    if guard is not None and guard.enabled and getattr(trainer, "is_deepspeed_enabled", False):
        raise XltError("the spike guard is not supported under DeepSpeed (it needs FSDP, DDP or a single process): "
                       "use accelerate_configs/fsdp2.yaml, or disable it with skip_step_sigma: 0, spike_factor: 0, "
                       "skip_nonfinite: false")
