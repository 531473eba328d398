"""Causal-LM losses from the final hidden states, without the (positions x vocabulary) logits.

transformers' ``ForCausalLMLoss`` upcasts the whole logits tensor to fp32: at a 128K vocabulary and 2 x 8192
positions that is ~8 GiB per copy, held from forward to backward. Here the loss is computed from the last hidden
states: ``liger`` (liger-kernel's fused linear cross-entropy, CUDA only) or ``chunked`` (pure torch: per chunk of
positions, the head projection in the compute dtype, cross-entropy in fp32, the chunk's logits recomputed in backward
by ``torch.utils.checkpoint``), so at most one chunk's logits exist at any time. The same per-token losses give the
per-language sums of ``loss_ja`` / ``loss_en`` as one reduction, with no host sync.

The head is called as a module (``head(hidden_chunk)``), not read as a weight: tied or untied heads, peft wrappers
(``trainable_token_indices``, ``modules_to_save``, LoRA on the head) and an FSDP2-wrapped head then behave as in the
model's own forward (torch's FSDP2 supports per-chunk standalone head calls).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from xlt.config import XltError

LOSS_IMPLEMENTATIONS = ("auto", "chunked", "liger", "model")
IGNORE_INDEX = -100
# Logit elements per chunk (positions x vocabulary): 2**26 fp32 elements = 256 MiB per chunk-sized buffer.
CHUNK_ELEMENTS = 1 << 26
# fp32 bytes per logit element alive at the peak of the loss: the log-softmax output (saved for backward), the
# gradient reaching it and the gradient it passes on (3 x 4 bytes in backward; forward holds the compute-dtype logits,
# their fp32 copy and the log-softmax output, no more). `xlt check` sizes the loss's memory with it.
FP32_BYTES_PER_LOGIT = 12


def liger_available() -> bool:
    """Whether liger-kernel can be imported (found, not imported: it pulls triton)."""
    try:
        return importlib.util.find_spec("liger_kernel") is not None
    except (ImportError, ValueError):
        return False


def resolve_loss_implementation(name: str, cuda: Optional[bool] = None,
                                importable: Callable[[], bool] = liger_available) -> str:
    """The loss path a run uses: ``auto`` is liger on a CUDA GPU when liger-kernel imports, else chunked."""
    if name not in LOSS_IMPLEMENTATIONS:
        raise XltError(f"loss_implementation={name!r}: expected one of {', '.join(LOSS_IMPLEMENTATIONS)}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name == "liger" and not (cuda and importable()):
        raise XltError("loss_implementation=liger: needs liger-kernel on a CUDA GPU (pip install 'xlt[gpu]'); "
                       "use chunked (pure torch) or auto")
    if name == "auto":
        return "liger" if cuda and importable() else "chunked"
    return name


def chunk_positions(vocab: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Positions per chunk so that one chunk's logits hold about ``chunk_elements`` elements."""
    return max(1, chunk_elements // max(vocab, 1))


def shift_targets(labels: torch.Tensor, shift_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The next-token target of every position, flattened: ``labels[t + 1]``, -100 after each row's last token
    (the shift ``ForCausalLMLoss`` makes); ``shift_labels`` when the batch carries them already shifted."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return shift_labels.reshape(-1)


def shift_langs(langs: torch.Tensor) -> torch.Tensor:
    """The language of each position's target, flattened (-1 after each row's last token)."""
    return F.pad(langs, (0, 1), value=-1)[..., 1:].reshape(-1)


def forward_hidden(model: Any, inputs: dict) -> torch.Tensor:
    """The last hidden states (after the final norm) from the model's own forward, with ``logits_to_keep`` an empty
    index so the head projects no position. The (wrapped) model is called as a whole: DDP's and FSDP2's hooks run
    as usual and the hidden states are one of its outputs (FSDP2 registers its pre-backward hook on them)."""
    device = next(v.device for v in inputs.values() if torch.is_tensor(v))
    keep = torch.empty(0, dtype=torch.long, device=device)
    return model(**inputs, logits_to_keep=keep, output_hidden_states=True).hidden_states[-1]


def output_head(unwrapped: Any) -> torch.nn.Module:
    """The output projection as the model's forward calls it: a peft wrapper (trainable tokens, modules_to_save,
    LoRA) when there is one, the embedding's module when tied."""
    base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    return base.get_output_embeddings()


def _fsdp_managed(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def head_projection(head: torch.nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """How the chunked loss applies the output head to a chunk of hidden states, or None where it cannot.

    Without FSDP2 the head is called as a module, so peft wrappers behave as in the model's forward. Under FSDP2
    the head belongs to a sharding group (accelerate puts the final norm and the head in one unit that stays
    unsharded after forward): calling it again as a module after the model's forward runs the group's hooks a
    second time, and its post-backward fires when the chunk's gradient arrives, before the final norm's backward,
    freeing weights the norm still needs (a segfault on CPU). So a plain linear head is applied as ``F.linear`` on
    its unsharded weight: the gradient accumulates into it before the group's own post-backward reduces it. A head
    wrapped by peft under FSDP2 gives None: the caller uses the model's logits for that run.
    """
    if not _fsdp_managed(head):
        return head
    if not isinstance(head, torch.nn.Linear):
        return None

    def project(h: torch.Tensor) -> torch.Tensor:
        weight = head.weight
        if hasattr(weight, "to_local"):
            raise XltError("loss_implementation chunked: the output head's weights are sharded after the forward "
                           "pass (its FSDP unit reshards after forward); use loss_implementation model")
        return F.linear(h, weight, head.bias)

    return project


def _chunk_ce(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)  # the compute dtype (autocast / FSDP's param dtype), as the model's own forward
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")


def per_token_ce(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
                 vocab: int, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """fp32 cross-entropy of every position (0 where ignored), chunk by chunk over the positions.

    With gradients on, each chunk runs under non-reentrant ``torch.utils.checkpoint``: forward keeps only the
    chunk's hidden states (a view of ``hidden``), backward recomputes the chunk's logits, so the peak is one
    chunk's logits and their gradient, not the whole batch's.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    step = chunk_positions(vocab, chunk_elements)
    parts = []
    for a in range(0, flat.shape[0], step):
        h, t = flat[a:a + step], targets[a:a + step]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_chunk_ce, head, h, t, use_reentrant=False))
        else:
            parts.append(_chunk_ce(head, h, t))
    return torch.cat(parts)


def language_sums(ce: torch.Tensor, targets: torch.Tensor, langs: torch.Tensor, n_langs: int) -> tuple[torch.Tensor,
                                                                                                        torch.Tensor]:
    """Per-language (sum of ce, token count) in float64, as one one-hot matmul: no boolean indexing, no host
    sync. Ignored targets and language ids outside ``range(n_langs)`` count nowhere."""
    ids = torch.arange(n_langs, device=ce.device)
    onehot = ((langs.to(ce.device)[:, None] == ids) & (targets != IGNORE_INDEX)[:, None]).double()
    return ce.detach().double() @ onehot, onehot.sum(0)


def normalise(total: torch.Tensor, n_valid: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
    """The Trainer's reduction of a summed loss: by the accumulated step's token count when the Trainer passes it
    (``num_items_in_batch``), else the micro-batch mean (``fixed_cross_entropy``)."""
    if num_items_in_batch is None:
        return total / n_valid.clamp(min=1)  # the model's mean; 0 / 1 when nothing is scored
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def chunked_causal_lm_loss(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                           vocab: int, num_items_in_batch: Any = None, shift_labels: Optional[torch.Tensor] = None,
                           langs: Optional[torch.Tensor] = None, n_langs: int = 0,
                           chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, Optional[tuple]]:
    """The causal-LM loss of ``ForCausalLMLoss`` from the last hidden states (any leading shape: (B, S, H) or a
    flattened (1, sum S, H)), and, when ``langs`` is given, the per-language (sums, counts) of the same tokens."""
    targets = shift_targets(labels, shift_labels).to(hidden.device)
    ce = per_token_ce(hidden, head, targets, vocab, chunk_elements)
    loss = normalise(ce.sum(), (targets != IGNORE_INDEX).sum(), num_items_in_batch)
    by_lang = language_sums(ce, targets, shift_langs(langs), n_langs) if langs is not None else None
    return loss, by_lang


def liger_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         num_items_in_batch: Any = None, shift_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The same loss through liger-kernel's fused linear cross-entropy (Triton, CUDA): the logits are never
    materialised, and the gradients of ``hidden`` and ``weight`` are computed chunk by chunk in its forward."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    targets = shift_targets(labels, shift_labels).to(hidden.device)
    fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    total = fn(weight, hidden.reshape(-1, hidden.shape[-1]), targets)
    return normalise(total, (targets != IGNORE_INDEX).sum(), num_items_in_batch)


def logits_language_sums(logits: torch.Tensor, labels: torch.Tensor, langs: torch.Tensor, n_langs: int,
                         chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-language sums and counts from logits the forward pass made anyway (no gradient, no host sync), upcast to
    fp32 one chunk of positions at a time."""
    with torch.no_grad():
        targets = shift_targets(labels).to(logits.device)
        ce = per_token_ce(logits, lambda x: x, targets, logits.shape[-1], chunk_elements)
        return language_sums(ce, targets, shift_langs(langs), n_langs)


def loss_buffer_bytes(impl: str, positions: int, vocab: int, hidden: int, compute_bytes: int,
                      chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Peak bytes of the loss beyond the model (per process): the logits and their gradients, whole under
    ``model``, one chunk under ``chunked`` (plus the chunk's V x H head gradient before autograd adds it up), one
    liger chunk (its fp32 logits and gradient, its fp32 gradient of the head, the gradient of the hidden states)."""
    if impl == "model":
        return positions * vocab * FP32_BYTES_PER_LOGIT
    if impl == "chunked":
        rows = min(positions, chunk_positions(vocab, chunk_elements))
        return rows * vocab * FP32_BYTES_PER_LOGIT + vocab * hidden * compute_bytes
    if impl == "liger":  # liger-kernel's chunking: next_power_of_2(ceil(positions / ceil(V / H))) positions
        rows = min(positions, 1 << max(0, (-(-positions // -(-vocab // hidden)) - 1).bit_length()))
        return rows * vocab * 8 + vocab * hidden * 4 + positions * hidden * 4
    raise ValueError(impl)
