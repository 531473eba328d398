"""Multi-process pieces: the gathered final save, the replica check, waiting for the main process.

Every function here that takes part in a collective must be called on every rank.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from xlt.config import XltError
from xlt.io import atomic_save_dir, wait_for  # noqa: F401 (wait_for: the launch helpers import it from here)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def is_main_process() -> bool:
    dist = _dist()
    return dist is None or dist.get_rank() == 0


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def is_sharded(param: Any) -> bool:
    from torch.distributed.tensor import DTensor, Shard

    return isinstance(param, DTensor) and any(isinstance(p, Shard) for p in param.placements)


def is_deepspeed(accelerator: Any) -> bool:
    return accelerator is not None and str(getattr(accelerator, "distributed_type", "")).endswith("DEEPSPEED")


def gather_full_state_dict(model: Any, accelerator: Any = None) -> dict:
    """The full (unsharded) state dict on the main process; call on EVERY rank (it is a collective when sharded).

    FSDP2 parameters are DTensor shards: torch's ``get_model_state_dict(full_state_dict=True)`` — the path
    accelerate and the Trainer use for FSDP2 — all-gathers them (offloaded to CPU, main process only). DeepSpeed
    goes through ``accelerator.get_state_dict``. Replicated parameters (one process, DDP) are read as they are.
    Non-main processes may get an empty dict.
    """
    if is_deepspeed(accelerator):
        return accelerator.get_state_dict(model)
    module = accelerator.unwrap_model(model, keep_torch_compile=False) if accelerator is not None else model
    if any(is_sharded(p) for p in module.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _retie(module, full)
    if not is_main_process():
        return {}  # replicated: only the main process writes, so only it copies the weights to host memory
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _retie(module: Any, state_dict: dict) -> dict:
    """Tied parameters (one tensor under several names, e.g. a tied output head) gathered as separate copies:
    one tensor again, so ``save_pretrained`` writes it once, as it does for an unsharded model."""
    first: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        for prefix in _WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        if id(p) in first and name in state_dict and first[id(p)] in state_dict:
            state_dict[name] = state_dict[first[id(p)]]
        first.setdefault(id(p), name)
    return state_dict


def save_final_model(model: Any, tokenizer: Any, final_dir: str, accelerator: Any = None,
                     dtype: Optional[str] = None) -> None:
    """Write the final model as a plain safetensors folder that the Auto classes load; call on EVERY rank.

    The weights are gathered through :func:`gather_full_state_dict` (a rank-0-only ``save_pretrained`` of a
    sharded model fails, or writes one shard); the main process writes a temporary folder and swaps it in,
    so ``final_dir`` is never half written. A LoRA (peft) model is saved merged: adapters folded into the
    base weights (from the gathered state dict, since sharded modules cannot merge in place). ``dtype``
    ('bfloat16', 'float32', ...; None: as trained): the floating tensors are cast to it after merging, and
    config.json's ``dtype`` says it.
    """
    state_dict = gather_full_state_dict(model, accelerator)
    if is_main_process():
        module = accelerator.unwrap_model(model, keep_torch_compile=False) if accelerator is not None else model
        peft_config = getattr(module, "peft_config", None)
        if peft_config:
            from xlt.train.lora import merged_state_dict, save_merged

            base = module.get_base_model()
            merged = cast_state_dict(merged_state_dict(state_dict, peft_config["default"]), dtype)
            save_merged(base.config, merged, tokenizer, final_dir)
            barrier()
            return
        state_dict = cast_state_dict(state_dict, dtype)

        def save(tmp: str) -> None:
            module.config.use_cache = True
            module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if dtype is not None:  # save_pretrained writes the dtype of the module's parameters, not of state_dict
                trained = module.config.dtype
                module.config.dtype = dtype
                module.config.save_pretrained(tmp)
                module.config.dtype = trained
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

        atomic_save_dir(save, final_dir)
    barrier()


SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_save_dtype(choice: str, base_config: Any) -> str:
    """The dtype the final model is saved in: ``save_dtype``, 'auto' being the base model's config dtype.

    A config that names no dtype (or one that is not a float type) gives float32: the weights as trained.
    """
    if choice not in SAVE_DTYPES:
        raise XltError(f"save_dtype={choice!r}: expected one of {', '.join(SAVE_DTYPES)}")
    if choice != "auto":
        return choice
    found = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None)
    name = str(found).removeprefix("torch.") if found is not None else "float32"
    return name if name in SAVE_DTYPES else "float32"


def base_save_dtype(choice: str, spec: str, trust_remote_code: bool = False) -> str:
    """:func:`resolve_save_dtype` against the config of the model a stage starts from (config only, no weights)."""
    if choice != "auto":
        return resolve_save_dtype(choice, None)
    from transformers import AutoConfig

    from xlt.models import resolve_model

    return resolve_save_dtype(choice, AutoConfig.from_pretrained(resolve_model(spec), trust_remote_code=trust_remote_code))


def cast_state_dict(state_dict: dict, dtype: Optional[str]) -> dict:
    """``state_dict`` with its floating tensors in ``dtype`` (None: unchanged). Each entry is replaced as it is
    cast, so the full-precision copy of a gathered tensor is freed as it goes; tensors shared by several keys
    (tied embeddings) stay shared."""
    if dtype is None:
        return state_dict
    import torch

    target = getattr(torch, dtype)
    cast: dict[tuple, Any] = {}
    for key, t in state_dict.items():
        if torch.is_tensor(t) and t.is_floating_point() and t.dtype != target:
            view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if view not in cast:
                cast[view] = t.to(target)
            state_dict[key] = cast[view]
    return state_dict


def _checksum(tensor: Any) -> Any:
    """An exact, order-sensitive integer checksum of a tensor's bits (equal bits <=> equal sums, in practice)."""
    import torch

    t = tensor.detach().contiguous().reshape(-1)
    words = t.view(torch.int32) if (t.numel() * t.element_size()) % 4 == 0 and t.element_size() >= 2 else \
        t.view(torch.uint8).to(torch.int32)
    w = words.to(torch.int64)
    weights = torch.arange(w.numel(), dtype=torch.int64, device=w.device) % 65521 + 1
    return torch.stack([w.sum(), (w * weights).sum()])


def replicas_in_sync(model: Any, accelerator: Any = None) -> Optional[bool]:
    """Compare every replicated parameter across ranks (one all-gather of checksums); call on EVERY rank.

    True: all equal; False: some replica differs (its weights went their own way — a rank-local decision
    changed them); None: nothing is replicated (one process, or every parameter sharded, or DeepSpeed, whose
    engine owns the partitions).
    """
    import torch

    dist = _dist()
    if dist is None or dist.get_world_size() == 1 or is_deepspeed(accelerator):
        return None
    module = accelerator.unwrap_model(model, keep_torch_compile=False) if accelerator is not None else model
    replicated = [p for p in module.parameters() if not is_sharded(p)]
    if not replicated:
        return None
    from torch.distributed.tensor import DTensor

    local = torch.stack([_checksum(p.to_local() if isinstance(p, DTensor) else p) for p in replicated]).cpu()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = local.to(device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def check_replicas(model: Any, accelerator: Any, step: int) -> Optional[bool]:
    """:func:`replicas_in_sync`, stopping the run with one line on a mismatch."""
    ok = replicas_in_sync(model, accelerator)
    if ok is False:
        raise XltError(f"replicas out of sync at step {step}: the processes hold different weights for replicated "
                       "parameters (a decision was taken on one rank only); stopping before saving a wrong model")
    return ok


def file_equals_json(path: str, value: Any) -> bool:
    import json

    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f) == value
    except (OSError, ValueError):
        return False
