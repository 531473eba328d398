"""Partial training: only the embeddings, the output head and the first / last decoder layers train for a fraction
of the run (recipe keys ``train_layers_first``, ``train_layers_last``, ``partial_training_fraction``).

For the first ``ceil(partial_training_fraction x max_steps)`` optimizer steps every other parameter (the middle
layers, the final norm) has ``requires_grad`` off; afterwards everything trains. The two recipes of Yamaguchi et
al. 2024 ("How Can We Effectively Expand the Vocabulary of LLMs with 0.01GB of Target Language Text?"):

* 2x2 LS: ``train_layers_first: 2, train_layers_last: 2, partial_training_fraction: 1`` (the whole run);
* 2-stage: ``train_layers_first: 0, train_layers_last: 0, partial_training_fraction: 0.5`` (embeddings + head for
  the first half, then everything).

Why ``requires_grad`` and not a zeroed gradient: autograd then computes no weight gradient for a frozen parameter
(the FLOPs xlt/flops.py charges), its ``.grad`` stays None, and torch's AdamW skips a parameter without a gradient
entirely: no update, no weight decay, and its ``exp_avg`` / ``exp_avg_sq`` / ``step`` are not touched (nor created),
so its first step after the phase is a normal first Adam step. The optimizer is built with every parameter (the
freeze is applied at ``on_train_begin``, after the Trainer created it), and the phase is decided from
``global_step`` (restored on resume) at the start of every optimizer step.

One process only: DDP's reducer and FSDP2's parameter groups are built once over the parameters that need a
gradient, and DeepSpeed owns the parameters, so a launch of several processes is refused before any model loads;
so are LoRA (peft freezes the base itself) and ``new_rows_warmup_fraction`` (its own freeze, of everything but the
new rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from transformers import TrainerCallback

from xlt.config import XltError
from xlt.flops import partial_steps, partial_trainable
from xlt.log import logger

_log = logger("xlt cpt")


@dataclass(frozen=True)
class PartialSettings:
    """The partial phase of one run (``steps`` in optimizer steps)."""

    first: int
    last: int
    fraction: float
    steps: int

    def describe(self, max_steps: int) -> str:
        return (f"partial training for {self.steps} of {max_steps} steps: embeddings, head, first {self.first} and "
                f"last {self.last} decoder layers train" + ("" if self.steps >= max_steps else "; then everything"))

    def report(self) -> dict:
        return {"train_layers_first": self.first, "train_layers_last": self.last,
                "partial_training_fraction": self.fraction, "partial_steps": self.steps}


def partial_settings(cpt_args: Any, max_steps: int, use_lora: bool = False, world_size: int = 1,
                     launcher_kind: str = "single", layers: Optional[int] = None) -> Optional[PartialSettings]:
    """The partial phase, or None when ``partial_training_fraction`` is 0; a one-line ``XltError`` for settings or
    a launch it cannot serve. Runs before any model loads (``layers``: the model's decoder layers, from its config)."""
    first, last, frac = cpt_args.train_layers_first, cpt_args.train_layers_last, cpt_args.partial_training_fraction
    if not frac:
        if first or last:
            key = "train_layers_first" if first else "train_layers_last"
            raise XltError(f"{key}={first or last} needs partial_training_fraction > 0 (1: the whole run)")
        return None
    if use_lora:
        raise XltError(f"partial_training_fraction={frac} is not supported with use_lora: remove it or set use_lora "
                       f"false")
    if cpt_args.new_rows_warmup_fraction:
        raise XltError(f"partial_training_fraction={frac} and new_rows_warmup_fraction="
                       f"{cpt_args.new_rows_warmup_fraction} both freeze parameters: use one of them")
    if world_size > 1 or launcher_kind in ("fsdp", "deepspeed"):
        raise XltError(f"partial_training_fraction={frac} runs on one process; this launch is {launcher_kind} with "
                       f"{world_size} process(es) (DDP / FSDP2 / DeepSpeed fix which parameters get gradients when "
                       f"they wrap the model)")
    if layers is not None and first + last > layers:
        raise XltError(f"train_layers_first={first} + train_layers_last={last} is more than the model's {layers} "
                       f"decoder layers")
    return PartialSettings(int(first), int(last), float(frac), partial_steps(frac, max_steps))


class PartialTraining(TrainerCallback):
    """Freezes everything outside the partial phase's trainable set while ``global_step < settings.steps``."""

    def __init__(self, model: Any, settings: PartialSettings) -> None:  # noqa: D107
        self.settings = settings
        keep = partial_trainable(model, settings.first, settings.last)
        self.frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
        self.active: Optional[bool] = None

    def apply(self, global_step: int) -> None:
        """Set the phase of the optimizer step after ``global_step`` (the same on every resume)."""
        active = global_step < self.settings.steps
        if active == self.active:
            return
        for p in self.frozen:
            p.requires_grad_(not active)
        if self.active and not active:
            _log(f"partial training done after {global_step} steps: every parameter trains from step {global_step + 1}")
        self.active = active

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - Trainer's signature
        self.apply(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - Trainer's signature
        self.apply(state.global_step)


def model_layers(model_spec: str, trust_remote_code: bool = False) -> int:
    """The decoder layers of a model from its config (no weights read)."""
    from transformers import AutoConfig

    from xlt.models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(model_spec), trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)
