"""``xlt check``: preflight a recipe against a launcher and the hardware, before any GPU is allocated.

    xlt check --config RECIPE [--accelerate_config FILE] [--offline] [--gpus N --gpu-memory-gb G]
              [--stage cpt|sft] [--json] [--key value ...]

Every decision is the one the training stages make (``xlt.train.runtime``, ``parse_recipe``, ``check_cpt_inputs``'s
parts, ``plan_steps``, the spike guard's backend rule); this module only runs them against the described hardware,
collects every problem instead of stopping at the first, and adds what only a preflight can say: packages the run
will import, whether the accelerate config fits the GPUs, and an estimate of the memory per GPU. Nothing here loads
weights or touches a GPU: TrainingArguments is built with ``use_cpu`` (its ``__post_init__`` would otherwise set
up this machine's device), the model is sized from its config on the meta device, and the visible hardware is read
with ``torch.cuda.device_count`` (NVML) and ``nvidia-smi``.

Exit status: 0 ok, 1 problems (one line each), 2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

from xlt.config import EMBEDDED_MODEL, XltError
from xlt.validate import check_cli_numbers

GIB = 1 << 30
CUDA_OVERHEAD_GIB = 3.0  # CUDA context, NCCL buffers, allocator fragmentation: a fixed allowance per GPU

# Known hub models, for the memory estimate offline: their config.json values (architecture-defining keys).
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                                     intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                                     vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False),
    "mistralai/Mistral-7B-v0.1": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32,
                                      intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                                      vocab_size=32000, max_position_embeddings=32768, sliding_window=4096,
                                      tie_word_embeddings=False),
    "meta-llama/Meta-Llama-3-8B": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                                       intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                                       vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                                       tie_word_embeddings=False),
    # The embedded default (HuggingFaceTB/SmolLM2-135M-Instruct), so its size needs no GGUF conversion.
    EMBEDDED_MODEL: dict(model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, tie_word_embeddings=True),
}

# report_to integrations and the packages transformers needs for them (any one of each tuple).
REPORT_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                   "comet_ml": ("comet_ml",), "clearml": ("clearml",), "trackio": ("trackio",)}


def importable(pkg: str) -> bool:
    """Whether ``pkg`` can be imported (found, not imported). The one probe of this module (tests replace it)."""
    try:
        return importlib.util.find_spec(pkg) is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------
# Hardware and launcher
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    """The GPUs per machine the run is checked against."""

    gpus: int
    gpu_memory_gb: Optional[float]  # GiB (2**30 bytes); None when unknown
    source: str  # "given" (--gpus) or "visible"


def _nvidia_smi_memory_gib() -> Optional[float]:
    """The smallest total memory of the visible GPUs, from nvidia-smi (no CUDA context); None if unknown."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.count(",") == 2]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = [v.strip() for v in visible.split(",") if v.strip()]
        rows = [r for r in rows if any(w == r[0] or r[1].startswith(w) for w in wanted)]
    try:
        mib = [float(r[2]) for r in rows]
    except ValueError:
        return None
    return min(mib) / 1024 if mib else None


def visible_hardware() -> Hardware:
    """This machine's GPUs. ``torch.cuda.device_count`` counts through NVML and creates no CUDA context."""
    import torch

    n = torch.cuda.device_count()
    return Hardware(n, _nvidia_smi_memory_gib() if n else None, "visible")


@dataclass
class LaunchPlan:
    """The launcher plus what the memory estimate needs from an accelerate config beyond ``Launcher``."""

    launcher: Any  # xlt.train.runtime.Launcher
    source: str
    num_machines: int = 1
    zero_stage: Optional[int] = None
    offload_optimizer: bool = False
    offload_params: bool = False
    fsdp_no_shard: bool = False
    fsdp_hybrid: bool = False
    fsdp_keeps_gathered: bool = False  # SHARD_GRAD_OP / reshard_after_forward: false
    from_file: bool = False


def _yaml_mapping(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}  # Launcher.from_config_file reports it
    return data if isinstance(data, dict) else {}


def launch_plan(path: Optional[str], hardware: Hardware) -> LaunchPlan:
    """The launcher an accelerate config describes; without one, accelerate's default config file, else what
    ``accelerate launch`` picks with no config (one process per GPU, DDP when more than one)."""
    from xlt.train.runtime import Launcher

    if path is None:
        from accelerate.commands.config.config_args import default_config_file

        if os.path.isfile(default_config_file):
            path = default_config_file
        else:
            n = max(hardware.gpus, 1)
            return LaunchPlan(Launcher(kind="ddp" if n > 1 else "single", world_size=n),
                              "no accelerate config: one process per GPU")
    launcher = Launcher.from_config_file(path)
    cfg = _yaml_mapping(path)
    plan = LaunchPlan(launcher, path, num_machines=int(cfg.get("num_machines", 1) or 1), from_file=True)
    if launcher.kind == "deepspeed":
        ds = cfg.get("deepspeed_config") or {}
        stage = ds.get("zero_stage")
        if stage is None and ds.get("deepspeed_config_file"):
            with contextlib.suppress(OSError, ValueError):
                with open(ds["deepspeed_config_file"], encoding="utf-8") as f:
                    stage = (json.load(f).get("zero_optimization") or {}).get("stage")
        plan.zero_stage = int(stage) if stage is not None else None
        plan.offload_optimizer = str(ds.get("offload_optimizer_device", "none")).lower() not in ("none", "")
        plan.offload_params = str(ds.get("offload_param_device", "none")).lower() not in ("none", "")
    elif launcher.kind == "fsdp":
        fsdp = cfg.get("fsdp_config") or {}
        strategy = str(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
        plan.fsdp_no_shard = strategy in ("NO_SHARD", "3")
        plan.fsdp_hybrid = strategy.startswith("HYBRID") or strategy in ("4", "5")
        plan.fsdp_keeps_gathered = (strategy in ("SHARD_GRAD_OP", "2")
                                    or str(fsdp.get("fsdp_reshard_after_forward", True)).lower() == "false")
        plan.fsdp_hybrid = plan.fsdp_hybrid or hsdp_mesh(cfg)[0] > 1
    return plan


def hsdp_mesh(cfg: dict) -> tuple[int, int]:
    """(dp_replicate_size, dp_shard_size) of an accelerate config's ``parallelism_config`` ((1, 0) without one:
    FSDP then shards over every process)."""
    pc = cfg.get("parallelism_config") or {}
    return (int(pc.get("parallelism_config_dp_replicate_size", 1) or 1),
            int(pc.get("parallelism_config_dp_shard_size", 0) or 0))


def _check_hsdp(chk: Check, plan: LaunchPlan) -> Optional[str]:
    """HSDP (shard within a machine, replicate across machines): the accelerate config's mesh against its
    processes and machines; returns the mesh as text, or None when the config asks for none."""
    if not plan.from_file:
        return None
    cfg = _yaml_mapping(plan.source)
    if not cfg.get("parallelism_config"):
        return None
    replicate, shard = hsdp_mesh(cfg)
    launcher, src = plan.launcher, plan.source
    if launcher.kind != "fsdp" or launcher.fsdp_version != 2:
        chk.problems.append(f"accelerate config {src}: parallelism_config (HSDP) needs FSDP2 (distributed_type: FSDP, "
                            "fsdp_version: 2)")
        return None
    n, machines = launcher.world_size, plan.num_machines
    per_machine = n // machines if n % machines == 0 else None
    if replicate * shard != n:
        chk.problems.append(f"accelerate config {src}: parallelism_config dp_replicate_size {replicate} x "
                            f"dp_shard_size {shard} = {replicate * shard} does not match num_processes {n} (HSDP: "
                            f"dp_replicate_size {machines} = num_machines, dp_shard_size {per_machine} = processes "
                            "per machine)")
    elif replicate > 1 and shard != per_machine:
        chk.problems.append(f"accelerate config {src}: parallelism_config dp_shard_size {shard} is not the "
                            f"{per_machine} processes of one machine: shards would span machines (set "
                            f"dp_replicate_size {machines}, dp_shard_size {per_machine})")
    return f"dp_replicate {replicate} x dp_shard {shard}"


def _check_throughput(chk: Check, report: dict, margs: Any, cuda_run: bool, lora: bool) -> None:
    """The throughput keys (compile_blocks, activation_checkpointing_every, float8) against the target."""
    from xlt.train.runtime import check_throughput_keys

    chk.attempt(check_throughput_keys, margs, cuda_run, importable=importable, lora=lora)
    report["throughput"] = {"compile_blocks": bool(getattr(margs, "compile_blocks", False)),
                            "activation_checkpointing_every": getattr(margs, "activation_checkpointing_every", 0),
                            "float8": bool(getattr(margs, "float8", False))}
    if report["throughput"]["float8"] and cuda_run:
        chk.skipped.append("float8: the GPU's compute capability (>= 8.9) is checked at launch")


# ---------------------------------------------------------------------------------------------------------
# Model size
# ---------------------------------------------------------------------------------------------------------
def model_config(spec: str, offline: bool, revision: Optional[str] = None,
                 trust_remote_code: bool = False) -> tuple[Optional[Any], str]:
    """(config, where it came from) without reading weights; (None, why) when it cannot be known.

    A local directory: its config.json. A hub id: config.json from the hub (online) or the local HF cache,
    then the table of known models. The embedded alias: the table (no GGUF conversion).
    """
    from transformers import AutoConfig

    if spec in KNOWN_MODELS and spec == EMBEDDED_MODEL:
        return AutoConfig.for_model(**KNOWN_MODELS[spec]), "xlt's table of known models"
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            return None, f"{spec} has no config.json"
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), f"{path}/config.json"
    try:
        cfg = AutoConfig.from_pretrained(spec, revision=revision, local_files_only=offline,
                                         trust_remote_code=trust_remote_code)
        return cfg, "the local HF cache" if offline else "the hub (config.json only)"
    except Exception as e:  # noqa: BLE001 - fall back to the table, else say why
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
    if spec in KNOWN_MODELS:
        return AutoConfig.for_model(**KNOWN_MODELS[spec]), "xlt's table of known models"
    return None, why


def extended_vocab(base_vocab: int, tok_args: Any) -> int:
    """Embedding rows after the recipe's tokenizer stage: base + new_tokens (extend) or new_tokens (swap), padded
    to pad_vocab_multiple as the stage pads them (an upper bound: the stage may find fewer merges)."""
    from xlt.tokenizer.embeddings import padded_size

    mode = getattr(tok_args, "tokenizer_mode", "none") if tok_args is not None else "none"
    if mode == "extend":
        return max(base_vocab, padded_size(base_vocab + tok_args.new_tokens, tok_args.pad_vocab_multiple))
    if mode == "swap":
        return padded_size(tok_args.new_tokens, tok_args.pad_vocab_multiple)
    return base_vocab


@dataclass
class ModelSize:
    """Parameter counts of the model as it will train (on the meta device: nothing allocated)."""

    params: int
    embedding: int  # input embedding + an untied output head
    layer: int  # one transformer block (for FSDP's all-gathered unit)
    hidden: int
    layers: int
    vocab: int
    tied: bool
    lora_trainable: Optional[int] = None


def size_model(config: Any, vocab: int, lora: Any = None, new_rows: int = 0) -> ModelSize:
    """Count the parameters of ``config`` with ``vocab`` embedding rows; with LoRA, the trainable ones too."""
    from xlt.models import meta_model
    from xlt.train.lora import check_lora_targets, embedding_names

    cfg = copy.deepcopy(config)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    text.vocab_size = vocab
    model = meta_model(cfg)
    params = sum(p.numel() for p in model.parameters())  # a tied head is one parameter, counted once
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and out.weight is inp.weight
    embedding = inp.weight.numel() + (out.weight.numel() if out is not None and not tied else 0)
    layers = int(text.num_hidden_layers)
    size = ModelSize(params, embedding, (params - embedding) // max(layers, 1), int(text.hidden_size), layers,
                     vocab, tied)
    if lora is not None:
        names = set(check_lora_targets(model, lora))
        adapters = sum(lora.lora_r * (m.in_features + m.out_features)
                       for n, m in model.named_modules() if n in names)
        if lora.lora_new_rows == "modules_to_save":
            rows = embedding
        else:
            embedding_names(model)
            rows = new_rows * size.hidden * (1 if tied or out is None else 2)
        size.lora_trainable = adapters + rows
    return size


# ---------------------------------------------------------------------------------------------------------
# Memory estimate
# ---------------------------------------------------------------------------------------------------------
MEMORY_NOTE = (
    "estimate per GPU, in GiB, per component of what the run allocates: weights in the master dtype, sharded "
    "gradients (master dtype, trainable only) and AdamW's 2 fp32 states (trainable only), each divided by the "
    "processes that shard it (FSDP / ZeRO-3: all; ZeRO-2: gradients + optimizer; ZeRO-1: optimizer; DDP: none); "
    "the compute-dtype weight copies (FSDP: the all-gathered units; DDP: autocast's bf16 cache); the unsharded "
    "compute-dtype gradients alive in backward (FSDP2 as xlt runs it, reduce-scattering every micro-batch: the "
    "root unit's (embeddings, head) until the end of backward plus two blocks in flight) and the fp32 reduce "
    "buffers (FSDP2: the largest unit cast to fp32; DDP: its gradient buckets); activations at "
    "per_device_train_batch_size x sequence length (per layer ~34*s*b*h bytes in bf16 without checkpointing, "
    "~2*s*b*h with full checkpointing plus one layer recomputed; Korthikanti et al. 2022, flash/sdpa attention: no "
    "s^2 term); the loss's logits (loss_implementation model: b*s*V x 12 bytes, the fp32 log-softmax and its "
    "gradients; chunked: one chunk of positions and the chunk's head gradient; liger: one liger chunk); + a fixed "
    f"{CUDA_OVERHEAD_GIB:g} GiB for CUDA/NCCL. Fragmentation varies: keep a margin."
)


def _shards(plan: LaunchPlan, world: int, gpus_per_machine: int) -> tuple[int, int, int]:
    """How many processes share the weights, the gradients and the optimizer states."""
    kind = plan.launcher.kind
    if kind == "fsdp" and not plan.fsdp_no_shard:
        n = gpus_per_machine if plan.fsdp_hybrid else world
        return n, n, n
    if kind == "deepspeed":
        stage = plan.zero_stage or 0
        return (world if stage >= 3 else 1), (world if stage >= 2 else 1), (world if stage >= 1 else 1)
    return 1, 1, 1


def _gradient_buffers(size: ModelSize, plan: LaunchPlan, trainable: int, master_bytes: int, compute_bytes: int,
                      sharded: bool) -> dict[str, float]:
    """Gradients beyond the sharded accumulators: FSDP2's unsharded compute-dtype gradients in backward and its
    fp32 reduce-scatter input (xlt reduce-scatters every micro-batch in fp32: xlt/train/fsdp.py); DDP's buckets."""
    kind = plan.launcher.kind
    if kind == "fsdp" and sharded:
        units = trainable if size.lora_trainable is not None else size.embedding + 2 * size.layer
        largest = trainable if size.lora_trainable is not None else max(size.embedding, 2 * size.layer)
        return {"unsharded_gradients": units * compute_bytes, "reduce_buffers": largest * 4}
    if kind == "ddp":
        return {"reduce_buffers": trainable * master_bytes}  # DDP's buckets (gradient_as_bucket_view off)
    return {}


def estimate_memory(size: ModelSize, plan: LaunchPlan, world: int, gpus_per_machine: int, master: str,
                    compute: str, batch: int, seq_len: int, checkpointing: bool, on_gpu: bool = True,
                    loss: str = "model") -> dict[str, float]:
    """The components of :data:`MEMORY_NOTE` (GiB per GPU, or per process on a CPU) and their ``total``."""
    out = memory_bytes(size, plan, world, gpus_per_machine, master, compute, batch, seq_len, checkpointing, loss)
    gib = {k: round(v / GIB, 2) for k, v in out.items()}
    overhead = CUDA_OVERHEAD_GIB if on_gpu else 0.0
    if on_gpu:
        gib["cuda_overhead"] = overhead
    gib["total"] = round(sum(out.values()) / GIB + overhead, 2)
    return gib


def memory_bytes(size: ModelSize, plan: LaunchPlan, world: int, gpus_per_machine: int, master: str, compute: str,
                 batch: int, seq_len: int, checkpointing: bool, loss: str = "model") -> dict[str, float]:
    """The components of :data:`MEMORY_NOTE` in bytes per process (without the CUDA allowance)."""
    from xlt.train.losses import loss_buffer_bytes

    kind = plan.launcher.kind
    master_bytes = 4 if master == "float32" else 2
    compute_bytes = {"bf16": 2, "fp16": 2}.get(compute, master_bytes)
    trainable = size.params if size.lora_trainable is None else size.lora_trainable
    shard_w, shard_g, shard_o = _shards(plan, world, gpus_per_machine)
    out = {
        "weights": size.params * master_bytes / shard_w * (0 if plan.offload_params else 1),
        "gradients": trainable * master_bytes / shard_g,
        "optimizer": trainable * 8 / shard_o * (0 if plan.offload_optimizer else 1),
    }
    # The compute-dtype copies of the weights.
    if kind == "fsdp" and compute_bytes < master_bytes:
        # The root unit (embeddings, head) stays gathered; blocks are gathered one at a time, the next prefetched.
        gathered = size.params if plan.fsdp_keeps_gathered else size.embedding + 2 * size.layer
        out["gathered_weights"] = gathered * compute_bytes
    elif kind in ("single", "ddp") and compute_bytes < master_bytes:
        out["autocast_weight_copies"] = size.params * compute_bytes  # held from forward until backward frees them
    out.update(_gradient_buffers(size, plan, trainable, master_bytes, compute_bytes, shard_g > 1))
    out["activations"] = activation_bytes(size, batch, seq_len, compute_bytes, checkpointing)
    out["logits"] = loss_buffer_bytes(loss, batch * seq_len, size.vocab, size.hidden, compute_bytes)
    return out


def activation_bytes(size: ModelSize, batch: int, seq_len: int, compute_bytes: int, checkpointing: bool) -> float:
    """Korthikanti et al. 2022: sbh(34 + 5as/h) bytes per layer in 16-bit; flash/sdpa attention stores no s x s
    scores, which drops the 5as/h term. Full checkpointing keeps each layer's input (2sbh) and recomputes one layer
    at a time during backward."""
    sbh = seq_len * batch * size.hidden * compute_bytes / 2
    return (size.layers * 2 * sbh + 34 * sbh) if checkpointing else size.layers * 34 * sbh


def memory_savings(size: ModelSize, plan: LaunchPlan, batch: int, seq_len: int, compute: str, master: str,
                   checkpointing: bool, loss: str, stage: str) -> list[str]:
    """Which components a key (or xlt's FSDP2 setting) removes, in GiB per GPU."""
    from xlt.train.losses import loss_buffer_bytes

    compute_bytes = {"bf16": 2, "fp16": 2}.get(compute, 4 if master == "float32" else 2)
    logits = {k: loss_buffer_bytes(k, batch * seq_len, size.vocab, size.hidden, compute_bytes) / GIB
              for k in ("model", "chunked")}
    if stage != "cpt":
        lines = [f"logits: {logits['model']:.2f} GiB (TRL's loss from the full logits)"]
    elif loss == "model":
        lines = [f"logits: {logits['model']:.2f} GiB -> {logits['chunked']:.2f} GiB with loss_implementation chunked"]
    else:
        lines = [f"logits: {logits['model']:.2f} GiB -> {logits[loss] if loss in logits else logits['chunked']:.2f} "
                 f"GiB with loss_implementation {loss} (model: the full fp32 logits)"]
    if not checkpointing:
        on, off = (activation_bytes(size, batch, seq_len, compute_bytes, c) / GIB for c in (True, False))
        lines.append(f"activations: {off:.2f} GiB -> {on:.2f} GiB with activation_checkpointing true")
    if plan.launcher.kind == "fsdp" and not plan.fsdp_no_shard and size.lora_trainable is None:
        every = (size.embedding + 2 * size.layer) * compute_bytes / GIB
        held = size.params * compute_bytes / GIB
        lines.append(f"unsharded_gradients: {held:.2f} GiB (accelerate's no_sync over gradient_accumulation_steps) "
                     f"-> {every:.2f} GiB with xlt's reduce-scatter every micro-batch")
    return lines


# ---------------------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Check:
    """Problems (one line each), skipped checks and notes, collected while the checks run."""

    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def attempt(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(...)``, or None with its one-line ``XltError`` recorded as a problem."""
        try:
            return fn(*args, **kwargs)
        except XltError as e:
            self.problems.append(str(e))
            return None

    def passes(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """Whether ``fn(...)`` raised no ``XltError`` (recorded as a problem when it did)."""
        before = len(self.problems)
        self.attempt(fn, *args, **kwargs)
        return len(self.problems) == before


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "y", "t", "on")


def _override(overrides: Sequence[str], key: str) -> Optional[str]:
    """The last ``--key value`` / ``--key=value`` on the command line, else None."""
    from xlt.config import recipe_value

    return recipe_value(overrides, {}, key)


def detect_stage(recipe: dict, overrides: Sequence[str]) -> str:
    """'sft' when the recipe (or the command line) lists sft_datasets, else 'cpt'."""
    return "sft" if "sft_datasets" in recipe or _override(overrides, "sft_datasets") is not None else "cpt"


def parse(stage: str, recipe_path: str, overrides: Sequence[str], precision: Optional[str] = None) -> tuple[Any, ...]:
    """The stage's dataclasses, parsed as ``xlt cpt`` / ``xlt sft`` parse them (xlt/cli.py).

    ``use_cpu`` is forced for the parse only: TrainingArguments' ``__post_init__`` sets up *this* machine's
    device (a CUDA context on a GPU machine; a refusal of bf16 on a CPU one), while the check describes the
    target hardware. The recipe's own ``use_cpu`` is read separately and judged against that hardware.
    ``precision``: what a recipe that leaves out bf16 / fp16 gets on the target hardware ('bf16' / 'fp32').
    """
    from xlt.config import CptRecipe, SftRecipe

    argv = ["--config", recipe_path, *overrides, "--use_cpu", "true"]
    return (CptRecipe if stage == "cpt" else SftRecipe).parse(argv, precision=precision)


def _check_packages(chk: Check, training_args: Any, plan: Optional[LaunchPlan], lora: Any) -> None:
    for name in getattr(training_args, "report_to", None) or []:
        pkgs = REPORT_PACKAGES.get(name)
        if pkgs and not any(importable(p) for p in pkgs):
            chk.problems.append(f"report_to: {name} needs the {pkgs[0]} package, which is not installed "
                                f"(pip install {pkgs[0]}), or set report_to: none")
    if plan is not None and plan.launcher.kind == "deepspeed" and not importable("deepspeed"):
        chk.problems.append(f"accelerate config {plan.source}: DeepSpeed needs the deepspeed package, which is not "
                            "installed (pip install 'xlt[gpu]'), or use accelerate_configs/fsdp2.yaml")
    if lora is not None and not importable("peft"):
        chk.problems.append("use_lora: LoRA needs the peft package, which is not installed (pip install peft)")


def _check_launcher(chk: Check, plan: LaunchPlan, hw: Hardware, training_args: Any, recipe_use_cpu: bool) -> None:
    """The accelerate config against the hardware and the recipe's precision / backend keys."""
    launcher, src = plan.launcher, plan.source
    cpu = launcher.use_cpu or recipe_use_cpu
    if hw.gpus > 0:
        if launcher.use_cpu:
            chk.problems.append(f"accelerate config {src}: use_cpu: true, but {hw.gpus} GPU(s) are {hw.source}: "
                                "training would run on the CPU (set use_cpu: false)")
        if recipe_use_cpu:
            chk.problems.append(f"use_cpu: true in the recipe, but {hw.gpus} GPU(s) are {hw.source}: training would "
                                "run on the CPU (remove use_cpu)")
        if not cpu:
            want = hw.gpus * plan.num_machines
            if launcher.world_size != want:
                chk.problems.append(
                    f"accelerate config {src}: num_processes {launcher.world_size} does not match {hw.gpus} GPU(s) "
                    f"{hw.source} x {plan.num_machines} machine(s) = {want} (set num_processes: {want}, or pass "
                    "--gpus to check other hardware)")
    elif not cpu:
        if launcher.kind != "single":
            chk.problems.append(f"accelerate config {src}: {launcher.describe()} needs GPUs, but none are "
                                f"{hw.source} (pass --gpus N to check against other hardware)")
        if training_args is not None and (training_args.bf16 or training_args.fp16):
            which = "bf16" if training_args.bf16 else "fp16"
            chk.problems.append(f"{which}: true needs a GPU, but none are {hw.source} (use_cpu: true for CPU "
                                "training, or pass --gpus N)")
    if training_args is None:
        return
    recipe_mp = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "no"
    if plan.from_file and launcher.mixed_precision != recipe_mp:
        chk.problems.append(f"accelerate config {src}: mixed_precision {launcher.mixed_precision} but the recipe has "
                            f"bf16: {str(training_args.bf16).lower()}, fp16: {str(training_args.fp16).lower()} "
                            f"(make them agree: mixed_precision {recipe_mp})")
    if training_args.deepspeed and launcher.kind != "deepspeed":
        chk.problems.append(f"deepspeed: {training_args.deepspeed} in the recipe, but the accelerate config {src} "
                            f"launches {launcher.kind} (choose one backend)")
    if training_args.fsdp and launcher.kind != "fsdp":
        chk.problems.append(f"fsdp: set in the recipe, but the accelerate config {src} launches {launcher.kind} "
                            "(set FSDP in the accelerate config only)")


def _hub_sources(chk: Check, sources: list, offline: bool) -> None:
    """Hub sources: opened (streaming, first metadata only) to check the text field, or skipped offline."""
    for s in sources:
        if not s.streaming or os.path.exists(s.dataset):
            continue
        if offline:
            chk.skipped.append(f"{s.key}: hub dataset {s.dataset} not contacted (--offline)")
        else:
            chk.attempt(s.open_hub_dataset)


def _data_note(chk: Check, data_args: Any, output_dir: str) -> None:
    """What continued pretraining will read: the token shards (prepared first when missing) or the stream."""
    from xlt.data.prepare import SUMMARY_FILE, prepared_dir_of

    if data_args.data_source != "shards":
        chk.notes.append("data: the in-memory stream (data_source: stream): process 0 reads, cleans and tokenizes "
                         "during training")
        return
    folder = prepared_dir_of(data_args, output_dir)
    if os.path.isfile(os.path.join(folder, SUMMARY_FILE)):
        chk.notes.append(f"data: token shards in {folder} (used when prepared with this run's settings, refused "
                         "in one line otherwise)")
    else:
        chk.notes.append(f"data: no token shards in {folder} yet: xlt cpt prepares them first, on one process; "
                         "for a large corpus run xlt data prepare --processes N beforehand")


def _check_cpt(chk: Check, parsed: Any, offline: bool) -> dict[str, Any]:
    """The checks of ``check_cpt_inputs``, each on its own so that every problem is reported."""
    from xlt.config import validate_data_args
    from xlt.data.sources import load_sources
    from xlt.data.stream import check_languages
    from xlt.models import check_model_spec

    model_args, tok_args, data_args, cpt_args = parsed.model, parsed.tokenizer, parsed.data, parsed.cpt
    lora, training_args = parsed.lora, parsed.training
    chk.attempt(validate_data_args, data_args)
    sources = chk.attempt(load_sources, data_args.sources, "sources")
    if sources is not None:  # else its one problem is reported; the languages cannot be judged
        chk.attempt(check_languages, data_args, sources)
    if data_args.eval_sources:
        sources = (sources or []) + (chk.attempt(load_sources, data_args.eval_sources, "eval_sources") or [])
    _hub_sources(chk, sources or [], offline)
    _data_note(chk, data_args, training_args.output_dir)
    chk.attempt(check_model_spec, model_args.model)
    if tok_args.tokenizer_mode not in ("none", "extend", "swap"):
        chk.problems.append(f"tokenizer_mode={tok_args.tokenizer_mode!r}: expected none, extend or swap")
    elif tok_args.tokenizer_mode != "none":
        from xlt.tokenizer.extend import check_tokenizer_inputs

        if tok_args.tokenizer_corpus:
            corpus = chk.attempt(load_sources, tok_args.tokenizer_corpus, "tokenizer_corpus") or []
            _hub_sources(chk, corpus, offline)
        hub_model = not os.path.isdir(os.path.expanduser(model_args.model)) and model_args.model != EMBEDDED_MODEL
        if offline and hub_model:
            chk.skipped.append(f"tokenizer: tokenizer.json of {model_args.model} not fetched (--offline)")
        chk.attempt(check_tokenizer_inputs, model_args.model, tok_args, read_tokenizer=not (offline and hub_model))
    if training_args.max_steps > 0 and cpt_args.train_tokens:
        chk.problems.append(f"max_steps={training_args.max_steps} and train_tokens={cpt_args.train_tokens} are both "
                            "set: train_tokens decides max_steps; remove one")
    return {"model": model_args.model, "revision": model_args.model_revision, "model_args": model_args,
            "tok_args": tok_args, "lora": lora if lora.use_lora else None, "seq_len": data_args.seq_len,
            "trust_remote_code": model_args.trust_remote_code, "loss_implementation": cpt_args.loss_implementation}


def _sft_model(chk: Check, sft_args: Any, training_args: Any, recipe_path: str) -> tuple[Optional[str], Any]:
    """The model SFT starts from and the tokenizer settings that sized it: the recipe's ``model``; else
    OUTPUT_DIR/cpt; else, before continued pretraining ran, the model of the cpt.yaml beside the recipe."""
    from xlt.config import TokenizerArguments
    from xlt.train.sft import resolve_sft_model

    if sft_args.model:
        return sft_args.model, None
    cpt_dir = os.path.join(training_args.output_dir, "cpt")
    if os.path.isdir(cpt_dir):
        return cpt_dir, None
    sibling = os.path.join(os.path.dirname(os.path.abspath(recipe_path)), "cpt.yaml")
    data = _yaml_mapping(sibling) if os.path.isfile(sibling) else {}
    if data and os.path.normpath(str(data.get("output_dir", ""))) == os.path.normpath(training_args.output_dir):
        chk.notes.append(f"model: {cpt_dir} (written by continued pretraining, not there yet); sized from {sibling}")
        keys = {k: data[k] for k in ("tokenizer_mode", "new_tokens", "pad_vocab_multiple") if k in data}
        return str(data.get("model", EMBEDDED_MODEL)), TokenizerArguments(**keys)
    chk.attempt(resolve_sft_model, sft_args, training_args.output_dir)
    return None, None


def _check_sft(chk: Check, parsed: Any, offline: bool, recipe_path: str) -> dict[str, Any]:
    from xlt.data.sft import check_sft_specs
    from xlt.models import check_model_spec

    sft_args, training_args = parsed.sft, parsed.training
    # hub specs: the first rows streamed and matched to the adapter's layouts (skipped with --offline)
    chk.attempt(check_sft_specs, sft_args.sft_datasets, hub=not offline)
    for i, spec in enumerate(sft_args.sft_datasets or []):
        if offline and isinstance(spec, dict) and spec.get("dataset") and not os.path.exists(spec["dataset"]):
            chk.skipped.append(f"sft_datasets[{i}]: hub dataset {spec['dataset']} not contacted (--offline)")
    if sft_args.prompt_format not in ("stablelm_alpaca", "chat"):
        chk.problems.append(f"prompt_format={sft_args.prompt_format!r}: expected stablelm_alpaca or chat")
    model, tok_args = _sft_model(chk, sft_args, training_args, recipe_path)
    if model is not None:
        chk.attempt(check_model_spec, model)
    return {"model": model, "revision": sft_args.model_revision, "model_args": sft_args, "tok_args": tok_args,
            "lora": None, "seq_len": training_args.max_length or 1024,
            "trust_remote_code": training_args.trust_remote_code}


def run_check(recipe: str, accelerate_config: Optional[str] = None, offline: bool = False,
              gpus: Optional[int] = None, gpu_memory_gb: Optional[float] = None, stage: Optional[str] = None,
              overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Check a recipe against a launcher and hardware; returns the report (``ok``, ``problems``, ...).

    Raises ``XltError`` only for bad usage (a file named on the command line is missing); everything else
    is collected in ``problems``.
    """
    from xlt.train.runtime import master_weights_dtype, resolve_attn_implementation

    for what, path in (("recipe", recipe), ("accelerate config", accelerate_config)):
        if path is not None and not os.path.isfile(path):
            raise XltError(f"{what} file not found: {path}")
    chk = Check()
    hw = _hardware(gpus, gpu_memory_gb)
    plan = chk.attempt(launch_plan, accelerate_config, hw)
    recipe_map = _yaml_mapping(recipe)
    stage = stage or detect_stage(recipe_map, overrides)
    use_cpu_value = _override(overrides, "use_cpu")
    recipe_use_cpu = _flag(use_cpu_value if use_cpu_value is not None else recipe_map.get("use_cpu", False))
    report = _new_report(chk, recipe, stage, hw)
    cuda_run = hw.gpus > 0 and not recipe_use_cpu and not (plan is not None and plan.launcher.use_cpu)
    parsed = chk.attempt(parse, stage, recipe, overrides, "bf16" if cuda_run else "fp32")
    training_args = parsed.training if parsed else None
    _check_precision_and_launcher(chk, report, plan, hw, training_args, cuda_run, recipe_use_cpu)
    if parsed is None:
        return _finish(report)
    info = _check_cpt(chk, parsed, offline) if stage == "cpt" else _check_sft(chk, parsed, offline, recipe)
    margs = info["model_args"]
    master = chk.attempt(master_weights_dtype, margs.master_weights_dtype, margs.torch_dtype)
    attn = chk.attempt(resolve_attn_implementation, margs.attn_implementation, cuda=cuda_run, importable=importable)
    report.update(master_weights_dtype=master, attn_implementation=attn)
    _check_throughput(chk, report, margs, cuda_run, info["lora"] is not None or bool(getattr(margs, "use_lora", False)))
    _check_packages(chk, training_args, plan, info["lora"])
    if stage == "cpt" and plan is not None and plan.launcher.kind == "deepspeed":
        from xlt.train.skip_step import SkipStepGuard, check_backend

        chk.attempt(check_backend, SimpleNamespace(is_deepspeed_enabled=True), SkipStepGuard.from_args(parsed.cpt))
    if info["lora"] is not None and not importable("peft"):
        info["lora"] = None  # reported above; size the model without it
    if plan is None:
        return _finish(report)
    world = report["world_size"]
    _check_steps(chk, report, stage, parsed, info, world, plan.launcher.kind)
    ckpt = report["activation_checkpointing"] = _checkpointing(training_args, info["model_args"], plan)
    loss = "model"  # SFT: TRL's loss from the full logits
    if stage == "cpt":
        from xlt.train.losses import resolve_loss_implementation

        loss = chk.attempt(resolve_loss_implementation, info["loss_implementation"], cuda=cuda_run,
                           importable=lambda: importable("liger_kernel")) or "model"
        report["loss_implementation"] = loss
    _memory(chk, report, info, plan, hw, world, master, training_args, ckpt != "off", offline, cuda_run, loss)
    return _finish(report)


def _check_precision_and_launcher(chk: Check, report: dict, plan: Any, hw: Hardware, training_args: Any,
                                  cuda_run: bool, recipe_use_cpu: bool) -> None:
    """The precision the run will train in, and the launcher against the hardware (processes, mesh)."""
    from xlt.train.runtime import precision_of

    if training_args is not None:
        decided = precision_of(training_args)
        where = f"{hw.gpus} GPU(s) {hw.source}" if cuda_run else "cpu"
        report["precision"] = decided["precision"] + (f" (auto: {where})" if decided["source"] != "recipe" else "")
    if plan is not None:
        world = hw.gpus * plan.num_machines if cuda_run else plan.launcher.world_size
        report.update(launcher=plan.launcher.describe(), launcher_source=plan.source, world_size=world)
        _check_launcher(chk, plan, hw, training_args, recipe_use_cpu)
        report["mesh"] = _check_hsdp(chk, plan)


def _hardware(gpus: Optional[int], gpu_memory_gb: Optional[float]) -> Hardware:
    """The hardware to check against: the given GPU count (and memory), else what this machine sees."""
    if gpus is not None:
        return Hardware(gpus, gpu_memory_gb, "given")
    visible = visible_hardware()
    return Hardware(visible.gpus, gpu_memory_gb if gpu_memory_gb is not None else visible.gpu_memory_gb, "visible")


def _new_report(chk: Check, recipe: str, stage: str, hw: Hardware) -> dict[str, Any]:
    """The report with every key present (None until a check fills it); the lists are the check's own."""
    return {"ok": False, "problems": chk.problems, "skipped": chk.skipped, "notes": chk.notes,
            "recipe": recipe, "stage": stage,
            "hardware": {"gpus_per_machine": hw.gpus, "gpu_memory_gb": hw.gpu_memory_gb, "source": hw.source},
            "launcher": None, "world_size": None, "tokens_per_step": None, "max_steps": None,
            "master_weights_dtype": None, "attn_implementation": None,
            "activation_checkpointing": None, "memory_per_gpu_gb": None,
            "memory_breakdown_gb": None, "memory_savings": [], "memory_note": MEMORY_NOTE}


def _check_steps(chk: Check, report: dict, stage: str, parsed: Any, info: dict, world: int,
                 kind: str = "single") -> None:
    """Tokens per step and the run length (cpt: the step plan, and the new_rows_* and partial-training refusals
    that depend on it and on the launcher ``kind``)."""
    training_args = parsed.training
    if stage == "cpt":
        from xlt.data.steps import plan_steps
        from xlt.train.new_rows import new_rows_settings
        from xlt.train.partial import partial_settings

        steps = chk.attempt(plan_steps, parsed.data, parsed.cpt, training_args, world)
        if steps is not None:
            report.update(tokens_per_step=steps.tokens_per_step, max_steps=steps.max_steps,
                          total_tokens=steps.total_tokens, steps_note=steps.describe())
            tok_args, cpt_args, lora = parsed.tokenizer, parsed.cpt, parsed.lora
            chk.attempt(new_rows_settings, cpt_args, tok_args.tokenizer_mode, training_args, steps.max_steps,
                        bool(lora.use_lora))
            chk.attempt(partial_settings, cpt_args, steps.max_steps, bool(lora.use_lora), world, kind)
        return
    rows = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world
    report["tokens_per_step"] = rows * info["seq_len"]
    report["steps_note"] = (f"tokens/step at most = max_length {info['seq_len']} x batch "
                            f"{training_args.per_device_train_batch_size} x grad_accum "
                            f"{training_args.gradient_accumulation_steps} x processes {world} (rows shorter "
                            "than max_length carry fewer)")
    if training_args.max_steps > 0:
        report["max_steps"] = training_args.max_steps
    else:
        report["steps_note"] += "; max_steps = num_train_epochs x examples / rows per step, known at launch"


def _checkpointing(training_args: Any, model_args: Any, plan: LaunchPlan) -> str:
    """The activation checkpointing the run will use: the runtime's decision, made on a stand-in (it mutates what
    it is given), or every k-th layer (``activation_checkpointing_every``)."""
    from xlt.train.runtime import own_activation_checkpointing

    every = getattr(model_args, "activation_checkpointing_every", 0)
    if every:
        return f"every {every}"
    return own_activation_checkpointing(
        SimpleNamespace(activation_checkpointing=bool(getattr(training_args, "activation_checkpointing", False))),
        plan.launcher, env={})


def _memory(chk: Check, report: dict, info: dict, plan: LaunchPlan, hw: Hardware, world: int, master: Optional[str],
            training_args: Any, checkpointing: bool, offline: bool, on_gpu: bool, loss: str = "model") -> None:
    if info["model"] is None:
        return
    config, where = model_config(info["model"], offline, info["revision"], info["trust_remote_code"])
    if config is None:
        chk.problems.append(f"memory: cannot estimate {'offline' if offline else 'the memory'}: no config of "
                            f"{info['model']} ({where}); give a local model directory")
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    base_vocab = int(text.vocab_size)
    vocab = extended_vocab(base_vocab, info["tok_args"])
    try:
        size = size_model(config, vocab, info["lora"], new_rows=vocab - base_vocab)
    except XltError as e:
        chk.problems.append(str(e))
        return
    compute = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else (master or "float32")
    mem = estimate_memory(size, plan, world, max(hw.gpus, 1), master or "float32", compute,
                          training_args.per_device_train_batch_size, info["seq_len"], checkpointing,
                          on_gpu=on_gpu, loss=loss)
    savings = memory_savings(size, plan, training_args.per_device_train_batch_size, info["seq_len"], compute,
                             master or "float32", checkpointing, loss, report["stage"])
    report.update(memory_per_gpu_gb=mem["total"], memory_breakdown_gb=mem, memory_savings=savings,
                  model_size={"params": size.params, "vocab": size.vocab, "hidden": size.hidden,
                              "layers": size.layers, "lora_trainable": size.lora_trainable, "config_from": where})
    if hw.gpu_memory_gb is None:
        chk.skipped.append("memory: GPU memory unknown (pass --gpu-memory-gb G)" if hw.gpus else
                           "memory: no GPU to compare with (the estimate is per process)")
    elif mem["total"] > hw.gpu_memory_gb:
        chk.problems.append(f"memory: estimated {mem['total']:.1f} GiB per GPU > {hw.gpu_memory_gb:g} GiB "
                            f"({hw.source}); lower per_device_train_batch_size, turn on activation_checkpointing, "
                            "or shard with FSDP (accelerate_configs/fsdp2.yaml)")


def _finish(report: dict) -> dict:
    report["ok"] = not report["problems"]
    return report


# ---------------------------------------------------------------------------------------------------------
# Output and the command
# ---------------------------------------------------------------------------------------------------------
def format_report(r: dict) -> str:
    """The readable table of ``xlt check``."""
    hw = r["hardware"]
    mem = hw["gpu_memory_gb"]
    rows = [
        ("recipe", f"{r['recipe']} ({r['stage']})"),
        ("hardware", f"{hw['gpus_per_machine']} GPU(s) per machine" + (f" x {mem:g} GiB" if mem else "")
         + f" ({hw['source']})"),
        ("launcher", f"{r['launcher']} ({r.get('launcher_source', '-')})" if r["launcher"] else "-"),
        ("master weights", r["master_weights_dtype"] or "-"),
        ("attention", r["attn_implementation"] or "-"),
        ("checkpointing", r["activation_checkpointing"] or "-"),
        ("precision", r.get("precision") or "-"),
        ("mesh", r.get("mesh") or "-"),
        ("tokens/step", f"{r['tokens_per_step']:,}" if r["tokens_per_step"] else "-"),
        ("max_steps", f"{r['max_steps']:,}" if r["max_steps"] else "-"),
        ("memory/GPU", f"{r['memory_per_gpu_gb']:.1f} GiB (estimate)" if r["memory_per_gpu_gb"] else "-"),
    ]
    lines = [f"{k:<16}{v}" for k, v in rows]
    if r["memory_breakdown_gb"]:
        lines += [f"  {k:<22}{v:>8.2f}" for k, v in r["memory_breakdown_gb"].items() if k != "total"]
    lines += [f"  {s}" for s in r.get("memory_savings") or []]
    if r.get("steps_note"):
        lines.append(f"steps: {r['steps_note']}")
    for title in ("notes", "skipped", "problems"):
        if r[title]:
            lines.append(f"{title}:")
            lines += [f"  - {p}" for p in r[title]]
    lines.append(f"ok: {str(r['ok']).lower()}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xlt check", allow_abbrev=False,
        description="Preflight a recipe: keys, packages, launcher vs hardware, precision, memory. Other "
                    "--key value arguments are recipe overrides, as in xlt cpt / xlt sft.")
    p.add_argument("--config", required=True, help="the recipe YAML")
    p.add_argument("--accelerate_config", "--accelerate-config", default=None,
                   help="accelerate config file of the launch (default: accelerate's default config, if any)")
    p.add_argument("--offline", action="store_true", help="do not contact the hub (checks that need it are skipped)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per machine to check against (default: visible)")
    p.add_argument("--gpu-memory-gb", "--gpu_memory_gb", dest="gpu_memory_gb", type=float, default=None,
                   help="memory of one GPU in GiB (default: the visible GPUs')")
    p.add_argument("--stage", choices=("cpt", "sft"), default=None, help="default: sft when sft_datasets is set")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    ns, overrides = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        check_cli_numbers(parser, ns)
    except XltError as e:
        parser.error(str(e))
    if overrides and not overrides[0].startswith("--"):
        parser.error(f"unexpected argument {overrides[0]!r} (recipe overrides are --key value)")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # library chatter must not break the one JSON object
            report = run_check(ns.config, ns.accelerate_config, ns.offline, ns.gpus, ns.gpu_memory_gb, ns.stage,
                               overrides)
    except XltError as e:
        print(f"xlt check: error: {e}", file=sys.stderr)
        return 2
    if ns.json:
        print(json.dumps(report, default=str))
    else:
        print(format_report(report))
    return 0 if report["ok"] else 1


