"""FSDP2 launches: the accelerate state on the CPU, gradient reduction every micro-batch in fp32, a sharding check.

:func:`setup_fsdp` runs in every training stage after the training arguments are parsed and right before the
Trainer (which creates the accelerator) is built:

* **On the CPU** (``accelerate_configs/cpu_fsdp2.yaml``). accelerate 1.16 turns FSDP on only from a GPU-type
  data-parallel state: ``AcceleratorState.__init__`` switches to ``DistributedType.FSDP`` in its branch over
  ``MULTI_GPU, MULTI_XPU, ...``, and a CPU process group is ``MULTI_CPU``, which that branch does not list (the
  environment still says ``ACCELERATE_USE_FSDP=true``, and the plugin is built, then dropped). The process group
  (gloo) and the device (cpu) are set up by then, in ``PartialState``; xlt marks that state data parallel, so the
  accelerator the Trainer creates next takes accelerate's own FSDP branch and ``prepare`` shards the model with
  ``fully_shard`` (DTensor parameters) exactly as on GPUs.
* **Gradient reduction** (FSDP2, any device). The Trainer keeps gradients unreduced under ``no_sync`` until the
  last micro-batch of an accumulation window: FSDP2 then holds a full unsharded gradient per parameter for the
  whole window and sums it in the compute dtype, and accelerate's policy reduce-scatters in the compute dtype
  (bf16). As torchtitan does, xlt reduce-scatters every micro-batch (``sync_each_batch``, which the Trainer
  honours) with ``reduce_dtype=float32``: sharded fp32 gradients accumulate, nothing unsharded outlives a
  backward pass, and no sum is rounded to bf16.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from xlt.config import XltError
from xlt.log import logger
from xlt.precision import truthy
from xlt.train.runtime import Launcher

_log = logger("xlt")


def on_cpu(training_args: Any, launcher: Launcher) -> bool:
    return bool(getattr(training_args, "use_cpu", False)) or launcher.use_cpu or \
        truthy(os.environ.get("ACCELERATE_USE_CPU", "false"))


def fsdp2_mixed_precision(training_args: Any) -> Any:
    """The FSDP2 policy: compute in the run's dtype (bf16 / fp16, or the weights' own), reduce in fp32."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    compute = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)


def _enable_fsdp_state_on_cpu() -> None:
    """Make the accelerator the Trainer creates next take accelerate's FSDP branch on a CPU process group."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    state = PartialState()
    if state.distributed_type == DistributedType.FSDP:
        return  # an accelerator of this process already runs FSDP
    if AcceleratorState._shared_state:
        raise XltError("FSDP on the CPU: an accelerator was created before xlt set FSDP up (internal order error)")
    if state.distributed_type == DistributedType.MULTI_CPU:
        # The one branch of AcceleratorState.__init__ that turns FSDP on lists the GPU-type data-parallel kinds;
        # it then records FSDP for the whole process (PartialState too). The device stays the CPU set up here.
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    elif state.distributed_type not in (DistributedType.MULTI_GPU, DistributedType.FSDP):
        raise XltError(f"FSDP on the CPU needs 2 or more processes (accelerate_configs/cpu_fsdp2.yaml); this launch "
                       f"runs {state.num_processes} as {state.distributed_type.value}")


def check_fsdp_launch(training_args: Any, launcher: Launcher) -> None:
    """Before any work: FSDP on the CPU shards over a gloo process group of 2 or more processes."""
    if launcher.kind == "fsdp" and launcher.world_size < 2 and on_cpu(training_args, launcher):
        raise XltError(f"FSDP on the CPU needs 2 or more processes (num_processes: 2, as in "
                       f"accelerate_configs/cpu_fsdp2.yaml); this launch starts {launcher.world_size}")


def setup_fsdp(training_args: Any, launcher: Launcher) -> Optional[str]:
    """Prepare an FSDP launch before the Trainer is built; returns what was set (for the log) or None.

    Call on every rank, after the training arguments exist and right before the Trainer is constructed.
    """
    if launcher.kind != "fsdp":
        return None
    done = []
    if launcher.fsdp_version == 2:
        acc = training_args.accelerator_config
        acc.gradient_accumulation_kwargs = {**(acc.gradient_accumulation_kwargs or {}), "sync_each_batch": True}
        policy = fsdp2_mixed_precision(training_args)
        training_args.fsdp_plugin_args = {**(training_args.fsdp_plugin_args or {}), "mixed_precision_policy": policy}
        compute = str(policy.param_dtype).replace("torch.", "") if policy.param_dtype else "the weights' dtype"
        done.append(f"reduce-scatter every micro-batch in float32 (compute in {compute})")
    if on_cpu(training_args, launcher):
        _ = training_args.device  # the process group and PartialState (TrainingArguments resets both when first set up)
        _enable_fsdp_state_on_cpu()
        done.append("FSDP on the CPU process group (gloo)")
    return "; ".join(done)


def sharding_summary(model: Any, optimizer: Any = None) -> dict:
    """How many trainable parameters (and optimizer parameters) are dim-0 sharded DTensors."""
    from xlt.train.distributed import is_sharded

    params = [p for p in model.parameters() if p.requires_grad]
    out = {"parameters": len(params), "sharded": sum(is_sharded(p) for p in params)}
    if optimizer is not None:
        opt = [p for g in optimizer.param_groups for p in g["params"]]
        out["optimizer_parameters"] = len(opt)
        out["optimizer_sharded"] = sum(is_sharded(p) for p in opt)
    return out


def sharding_check() -> Any:
    """A callback that, once the Trainer has prepared the model, stops an FSDP launch whose model is not sharded
    and logs how much is: the proof that the run trains DTensor shards, not replicas."""
    from transformers import TrainerCallback

    class ShardingCheck(TrainerCallback):
        summary: Optional[dict] = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):  # noqa: ANN001
            s = self.summary = sharding_summary(model, optimizer)
            if not s["sharded"] or s.get("optimizer_sharded") == 0:
                raise XltError(f"FSDP launch, but the prepared model is not sharded ({s['sharded']} of "
                               f"{s['parameters']} trainable parameters are DTensor shards)")
            if state.is_world_process_zero:
                _log(f"FSDP2: {s['sharded']} of {s['parameters']} trainable parameters are DTensor shards; the "
                     f"optimizer steps {s.get('optimizer_sharded', 0)} sharded parameters")

    return ShardingCheck()
