"""The launch environment and the decisions that depend on it: launcher, precision, attention, checkpointing.

Each decision is a function of recipe keys, the variables ``accelerate launch`` sets (or an accelerate config
file, for the preflight check) and the packages that import, so ``xlt check`` (before any GPU is touched) and
the training stages decide the same way. Nothing here loads a model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Optional

from xlt.config import XltError
from xlt.precision import precision_of, resolve_precision  # noqa: F401 (part of the launch decisions)
from xlt.precision import truthy as _truthy

LauncherKind = Literal["single", "ddp", "fsdp", "deepspeed"]
ATTN_CHOICES = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
_FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
MASTER_DTYPES = ("float32", "bfloat16")
_LOW_PRECISION = ("bfloat16", "bf16", "float16", "fp16", "half")


@dataclass(frozen=True)
class Launcher:
    """How the processes were (or will be) started: what kind of data parallelism, how many, which precision."""

    kind: LauncherKind
    world_size: int = 1
    fsdp_version: Optional[int] = None
    fsdp_activation_checkpointing: bool = False
    mixed_precision: str = "no"
    use_cpu: bool = False

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> Launcher:
        """The launcher of this process, from the variables ``accelerate launch`` / torchrun set."""
        env = os.environ if env is None else env
        world = int(env.get("WORLD_SIZE", "1") or 1)
        if _truthy(env.get("ACCELERATE_USE_DEEPSPEED", "false")):
            kind: LauncherKind = "deepspeed"
        elif _truthy(env.get("ACCELERATE_USE_FSDP", "false")):
            kind = "fsdp"
        else:
            kind = "ddp" if world > 1 else "single"
        return cls(kind=kind, world_size=world,
                   fsdp_version=int(env.get("FSDP_VERSION", "1")) if kind == "fsdp" else None,
                   fsdp_activation_checkpointing=_truthy(env.get("FSDP_ACTIVATION_CHECKPOINTING", "false")),
                   mixed_precision=env.get("ACCELERATE_MIXED_PRECISION", "no"),
                   use_cpu=_truthy(env.get("ACCELERATE_USE_CPU", "false")))

    @classmethod
    def from_config_file(cls, path: str) -> Launcher:
        """The launcher an accelerate config file describes (for the preflight check)."""
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                cfg = yaml.safe_load(f)
        except OSError as e:
            raise XltError(f"accelerate config {path}: {e.strerror}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise XltError(f"accelerate config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(cfg, dict):
            raise XltError(f"accelerate config {path}: expected a mapping of key: value")
        dist = str(cfg.get("distributed_type", "NO")).upper()
        nproc = int(cfg.get("num_processes", 1) or 1)
        fsdp = cfg.get("fsdp_config") or {}
        if dist == "DEEPSPEED":
            kind: LauncherKind = "deepspeed"
        elif dist == "FSDP":
            kind = "fsdp"
        elif dist in ("MULTI_GPU", "MULTI_CPU") and nproc > 1:
            kind = "ddp"
        else:
            kind = "single"
        return cls(kind=kind, world_size=nproc if kind != "single" else 1,
                   fsdp_version=int(fsdp.get("fsdp_version", 1)) if kind == "fsdp" else None,
                   fsdp_activation_checkpointing=_truthy(fsdp.get("fsdp_activation_checkpointing", False)),
                   mixed_precision=str(cfg.get("mixed_precision", "no")), use_cpu=_truthy(cfg.get("use_cpu", False)))

    @property
    def name(self) -> str:
        """The launcher as report.json names it: ``fsdp2`` for an FSDP version-2 launch, else the kind."""
        return "fsdp2" if self.kind == "fsdp" and self.fsdp_version == 2 else self.kind

    def describe(self) -> str:
        extra = f" v{self.fsdp_version}" if self.kind == "fsdp" else ""
        return f"{self.kind}{extra} x{self.world_size}" + (" (cpu)" if self.use_cpu else "")


# ---------------------------------------------------------------------------------------------------------
# Precision: fp32 master weights unless a recipe asks for pure bf16 by name
# ---------------------------------------------------------------------------------------------------------
def master_weights_dtype(master: str, torch_dtype: Optional[str]) -> str:
    """The dtype training loads (and the optimizer updates) the weights in: 'float32' or 'bfloat16'.

    Loading in bf16 with ``bf16: true`` on one GPU or DDP is pure-bf16 AdamW: at LR 1e-5 most updates round
    to nothing (a one-step test changes ~15% of the weights instead of ~96%). So the load dtype follows
    ``master_weights_dtype`` (default float32; bf16 compute comes from autocast or FSDP2's mixed-precision
    policy), and a low-precision ``torch_dtype`` without asking for pure bf16 by name is refused.
    """
    if master not in MASTER_DTYPES:
        raise XltError(f"master_weights_dtype={master!r}: expected float32 or bfloat16")
    if master == "float32" and str(torch_dtype).lower() in _LOW_PRECISION:
        raise XltError(f"torch_dtype={torch_dtype} would train pure {torch_dtype} weights (most small updates round "
                       "to nothing); remove torch_dtype (fp32 master weights, bf16 compute with bf16: true) or set "
                       "master_weights_dtype: bfloat16 to ask for pure bf16")
    return master


def warn_pure_bf16(master: str) -> None:
    if master == "bfloat16":
        warnings.warn("master_weights_dtype=bfloat16: pure-bf16 training as the recipe asks; updates smaller than "
                      "bf16's resolution (about 1/256 of a weight) are lost", stacklevel=2)


# ---------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------
def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_attn_implementation(name: Optional[str], cuda: Optional[bool] = None,
                                importable=lambda pkg: importlib.util.find_spec(pkg) is not None) -> str:
    """The attention implementation to load the model with, checked before any work.

    ``auto`` picks the fastest kernel that keeps packed documents apart: on a CUDA GPU flash_attention_2 when
    flash-attn imports (batches go in the flattened varlen layout, xlt/data/collate.py), else flex_attention
    when triton imports (transformers builds a document block mask from the packed position ids; sdpa would
    need a dense (B, 1, S, S) mask, which rules out its flash kernel), else sdpa; sdpa on a CPU. A flash
    implementation asked for by name needs its package and a GPU: refused with one line otherwise. ``cuda``
    overrides the detection (the preflight check describes hardware it is not running on).
    """
    name = name or "sdpa"
    if name not in ATTN_CHOICES:
        raise XltError(f"attn_implementation={name!r}: expected one of {', '.join(ATTN_CHOICES)}")
    cuda = _cuda_available() if cuda is None else cuda
    if name == "auto":
        if not cuda:
            return "sdpa"
        return "flash_attention_2" if importable("flash_attn") else "flex_attention" if importable("triton") else "sdpa"
    if name in _FLASH_PACKAGES:
        pkg = _FLASH_PACKAGES[name]
        if not importable(pkg):
            raise XltError(f"attn_implementation={name} needs the {pkg} package, which is not installed "
                           "(pip install 'xlt[gpu]'), or use attn_implementation: auto (falls back to flex_attention or sdpa)")
        if not cuda:
            raise XltError(f"attn_implementation={name} needs a CUDA GPU; use auto or sdpa on this machine")
    return name


# ---------------------------------------------------------------------------------------------------------
# Activation checkpointing: the recipe key is the one owner
# ---------------------------------------------------------------------------------------------------------
def own_activation_checkpointing(training_args: Any, launcher: Launcher, env: Optional[dict] = None) -> str:
    """Make the recipe's ``activation_checkpointing`` the single switch; returns 'fsdp', 'trainer' or 'off'.

    transformers' Trainer raises when FSDP's own activation checkpointing and the training argument are both
    on (and TRL's SFTConfig turns the argument on by default), and it recommends FSDP's under FSDP. So under
    FSDP the request is handed to FSDP (the variable its plugin reads when the Trainer creates the
    accelerator) and the Trainer's is turned off; elsewhere the Trainer checkpoints. An accelerate config
    that sets ``fsdp_activation_checkpointing`` no longer decides anything on its own.
    """
    env = os.environ if env is None else env
    want = bool(getattr(training_args, "activation_checkpointing", False))
    if launcher.kind == "fsdp":
        env["FSDP_ACTIVATION_CHECKPOINTING"] = "true" if want else "false"
        training_args.activation_checkpointing = False
        if hasattr(training_args, "gradient_checkpointing"):
            training_args.gradient_checkpointing = False  # the deprecated alias must agree
        return "fsdp" if want else "off"
    return "trainer" if want else "off"


# ---------------------------------------------------------------------------------------------------------
# Throughput keys: per-block compile, selective activation checkpointing, float8
# ---------------------------------------------------------------------------------------------------------
FLOAT8_MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada / Hopper and newer


def check_throughput_keys(args: Any, cuda: bool, importable=lambda pkg: importlib.util.find_spec(pkg) is not None,
                          capability: Optional[tuple[int, int]] = None, lora: bool = False) -> None:
    """One-line ``XltError`` for a throughput key this run cannot honour, before any model loads.

    ``args``: ModelArguments or SftArguments. ``cuda``: the run (or the checked target) trains on CUDA GPUs;
    ``capability``: their compute capability when known (None: not known here, e.g. ``xlt check --gpus N``).
    """
    every = getattr(args, "activation_checkpointing_every", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise XltError(f"activation_checkpointing_every={every!r}: expected an integer >= 0 (0: off; k: layers 0, "
                       "k, 2k, ... are checkpointed)")
    if getattr(args, "compile_blocks", False) and not cuda and not shutil.which(os.environ.get("CXX", "g++")):
        raise XltError("compile_blocks: true on the CPU needs a C++ compiler for torch.compile's inductor backend "
                       "(g++, or $CXX); install one or set compile_blocks: false")
    if getattr(args, "float8", False):
        if lora:
            raise XltError("float8: true with LoRA is not supported (float8 converts the frozen base linears); set "
                           "float8: false or train all weights")
        if not importable("torchao"):
            raise XltError("float8: true needs the torchao package, which is not installed (pip install torchao), "
                           "or set float8: false")
        if not cuda:
            raise XltError("float8: true needs an H100-class CUDA GPU (compute capability >= 8.9); this run has "
                           "none (set float8: false)")
        if capability is not None and tuple(capability) < FLOAT8_MIN_CAPABILITY:
            raise XltError(f"float8: true needs compute capability >= 8.9 (H100-class); this GPU has "
                           f"{capability[0]}.{capability[1]} (set float8: false)")


def cuda_capability() -> Optional[tuple[int, int]]:
    """The compute capability of this process's CUDA GPU, or None without one."""
    import torch

    return tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None


def compile_blocks(training_args: Any, env: Optional[dict] = None) -> bool:
    """``compile_blocks: true``: torch.compile each transformer block (accelerate's regional compilation).

    The Trainer hands ``torch_compile`` to accelerate's TorchDynamoPlugin, which reads
    ``use_regional_compilation`` from the environment: accelerate then compiles the repeated blocks one by one
    (compile_regions; in place under FSDP2, after activation checkpointing and before sharding) instead of the
    whole model, so one compiled block serves every layer and the cold start is one block's compile.
    """
    env = os.environ if env is None else env
    training_args.torch_compile = True
    training_args.torch_compile_backend = training_args.torch_compile_backend or "inductor"
    env["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] = "true"
    return True


def checkpoint_every(model: Any, every: int, training_args: Any, launcher: Launcher,
                     env: Optional[dict] = None) -> list[int]:
    """``activation_checkpointing_every: k``: checkpoint decoder layers 0, k, 2k, ...; returns their indices.

    One mechanism under every launcher: transformers' per-layer switch, ``activation_checkpointing_enable(
    every_n_layers=k)`` (``GradientCheckpointingLayer`` checkpoints its ``forward``, so FSDP2's hooks stay
    outside the checkpoint and a recompute under FSDP2 gathers nothing twice). The Trainer's and FSDP's own
    all-layer checkpointing are turned off so that neither re-enables every layer.
    """
    env = os.environ if env is None else env
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise XltError(f"activation_checkpointing_every={every}: {type(model).__name__} has no checkpointable "
                       "decoder layers (transformers' GradientCheckpointingLayer)")
    model.activation_checkpointing_enable(every_n_layers=every)
    training_args.activation_checkpointing = False
    if hasattr(training_args, "gradient_checkpointing"):
        training_args.gradient_checkpointing = False
    if launcher.kind == "fsdp":
        env["FSDP_ACTIVATION_CHECKPOINTING"] = "false"
    return [i for i, layer in enumerate(layers) if layer.gradient_checkpointing]


def float8_linears(model: Any) -> int:
    """``float8: true``: torchao's float8 training (dynamic tensorwise scaling) on the block linears.

    The output head and any linear whose dimensions are not multiples of 16 (float8 matmul's constraint) stay
    in bf16, as torchtitan does. Call after the model loads and before the Trainer wraps or shards it.
    Returns how many linears were converted.
    """
    import torch
    from torchao.float8 import convert_to_float8_training

    head = model.get_output_embeddings()

    def keep(module: Any, fqn: str) -> bool:
        return (isinstance(module, torch.nn.Linear) and module is not head
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    before = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    convert_to_float8_training(model, module_filter_fn=keep)
    return before - sum(type(m) is torch.nn.Linear for m in model.modules())


def trains_on_cuda(training_args: Any, env: Optional[Mapping[str, str]] = None) -> bool:
    """Whether this process trains on a CUDA GPU (not ``use_cpu`` in the recipe or the accelerate launch)."""
    env = os.environ if env is None else env
    if getattr(training_args, "use_cpu", False) or _truthy(env.get("ACCELERATE_USE_CPU", "false")):
        return False
    return _cuda_available()


def apply_throughput_keys(model: Any, args: Any, training_args: Any, launcher: Launcher) -> dict:
    """Apply the checked throughput keys to a loaded model and the training arguments; returns what was done
    (report.json ``throughput``). Call before ``own_activation_checkpointing`` and before the Trainer."""
    done: dict[str, Any] = {"compile_blocks": False, "checkpointed_layers": None, "float8_linears": 0}
    if getattr(args, "float8", False):
        done["float8_linears"] = float8_linears(model)
    if getattr(args, "activation_checkpointing_every", 0):
        done["checkpointed_layers"] = checkpoint_every(model, args.activation_checkpointing_every, training_args,
                                                       launcher)
    if getattr(args, "compile_blocks", False):
        done["compile_blocks"] = compile_blocks(training_args)
    return done
