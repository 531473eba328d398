"""Batches of packed rows in the layout the attention kernel keeps per-document.

Packed rows (xlt/data/packing.py) carry ``position_ids`` that restart at 0 at every segment and no attention
mask. transformers turns those restarts into a per-segment mask for sdpa / eager (a 4-D mask) and flex_attention
(a document block mask), at any batch size. For flash attention (flash_attention_2 / _3 and any kernel whose
name says flash) it builds no mask: it finds segments only in a single flattened row (``_is_packed_sequence``
needs batch size 1) or from precomputed ``cu_seq_lens_q/k`` + ``max_length_q/k``. At batch size > 1 each row
would be one causal sequence and documents would attend to each other.

So on the flash path a batch is flattened to one ``(1, B*S)`` row with the varlen keys TRL's padding-free
collator and transformers' ``DataCollatorWithFlattening`` emit. Those collators cannot be reused as they are:
they build position ids and segments from whole examples, while a packed row already holds several segments.
The flattening runs on each process after accelerate has dispatched its rows (``for_model``): accelerate's
dispatcher concatenates and slices collated batches along dim 0, which a single flattened row and a
``cu_seq_lens`` vector cannot cross. Every (B, S) tensor of the batch (input ids, position ids, labels, the
per-token language) is flattened alike, so the loss, the loss by language and the distillation term see the
same tokens in the same order; a row's first label is -100 (a segment start), so the causal shift never scores
a token from the previous row.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

VARLEN = "varlen"
POSITION_IDS = "position_ids"


def packed_layout(attn_implementation: Optional[str]) -> str:
    """``varlen`` where transformers builds no per-document mask from position ids (flash kernels), else
    ``position_ids`` (sdpa / eager / flex build it from the restarts)."""
    from transformers.utils.generic import is_flash_attention_requested

    return VARLEN if is_flash_attention_requested(requested_attention_implementation=attn_implementation) \
        else POSITION_IDS


def flatten_packed(batch: dict[str, Any]) -> dict[str, Any]:
    """One ``(1, B*S)`` row and its ``cu_seq_lens_q/k`` / ``max_length_q/k`` from a batch of packed rows.

    The segment boundaries are read from a host copy of ``position_ids`` (one device-to-host copy per
    micro-batch); transformers would otherwise derive them with device syncs in every layer.
    """
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    pos = batch["position_ids"]
    shape = tuple(pos.shape)
    out = {k: v.reshape(1, shape[0] * shape[1], *v.shape[2:])
           if isinstance(v, torch.Tensor) and tuple(v.shape[:2]) == shape else v for k, v in batch.items()}
    (cu, _), (longest, _) = prepare_fa_kwargs_from_position_ids(pos.detach().to("cpu", torch.long))
    cu = cu.to(pos.device, non_blocking=True)
    out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu
    out["max_length_q"] = out["max_length_k"] = int(longest)
    return out


class PackedRowsCollator:
    """The CPT collator, chosen by the attention implementation the model runs.

    ``__call__`` (the DataLoader, on the process that reads the stream) stacks rows into (B, S) tensors;
    ``for_model`` (every process, on its own rows, before the forward pass) gives them the layout of
    ``self.layout``: unchanged for ``position_ids``, flattened by ``flatten_packed`` for ``varlen``.
    """

    def __init__(self, attn_implementation: Optional[str]) -> None:  # noqa: D107
        self.layout = packed_layout(attn_implementation)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        from transformers import default_data_collator

        return default_data_collator(features)

    def for_model(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.layout == VARLEN and "position_ids" in batch:
            return flatten_packed(batch)
        return batch
