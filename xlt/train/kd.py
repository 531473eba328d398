"""Knowledge distillation from the base model early in continued pretraining (recipe keys ``kd_*``).

Loss = LM loss + ``kd_weight`` x KD during the first ``ceil(kd_fraction x max_steps)`` optimizer steps, decided
from the Trainer's ``global_step`` (the same on every rank, restored on resume); the LM loss alone afterwards, and
the teacher is freed at the first step past the window.

Teacher: the tokenizer stage's *input* model (the base), loaded once per process, frozen, in eval mode and in the
compute dtype (bf16 / fp16 when the run trains in it, else the master-weights dtype).

How the two vocabularies are matched (``tokenizer_mode: extend``): the extended vocabulary keeps every old id and
each new id is a merge of old tokens, so

* the teacher reads the *same text* as the student: every new id of the student's row is replaced by its old
  pieces (``expand_ids``: the base BPE run on the new token's string, as the tokenizer stage computes them; for an
  extension this is exactly the base tokenizer's segmentation of the text);
* the student's position after token ``i`` is aligned with the teacher's position after the *last piece* of token
  ``i``: both have read exactly the same text prefix and both predict what follows it;
* at an aligned position the term is ``T^2 x KL(p_teacher || p_student)``, where both distributions are the
  temperature-``T`` softmax over the *old ids only* (the student's logits restricted to the old ids and
  renormalised; padding rows excluded on both sides): the student's distribution over the next token given that
  it is an old one, against the base model's;
* it is averaged over the aligned positions whose label is not -100 (the positions the LM loss scores: a segment's
  first label is -100, so no position predicts across a packed-document boundary), with the same normaliser the
  Trainer gives the LM loss (tokens of the whole accumulated step across processes, or the micro-batch mean);
* packed rows: the student's segments are found as transformers finds them (a ``position_ids`` step other than
  +1 starts a new segment, xlt/data/packing.py restarts them at 0); the teacher's ``position_ids`` restart at the
  same segment starts and count the expanded pieces, so each document's attention stays inside it for the teacher
  too. Teacher rows are right-padded to the longest (its own segment, after every real token: causal attention
  never lets it change an earlier position).

With ``tokenizer_mode: none`` the vocabularies are the same: the alignment is the identity over the full
vocabulary. ``swap`` (new ids that are not merges of old ones), LoRA and DeepSpeed (the teacher would be a full
unsharded copy on every rank) are refused before any model loads. Under FSDP the teacher is sharded like the student
(torch's ``fully_shard`` per decoder layer, then the whole model): each process keeps ``1 / world`` of it, and its
forward all-gathers one layer at a time. Every process runs the same number of teacher forwards (one per
micro-batch, the window decided from ``global_step``), so those all-gathers line up across processes.

Compute: ``distill_flops = 2 x N_teacher x teacher tokens`` (every token the teacher's forward read, padding
included; ``N_teacher`` the teacher's effective parameters as ``xlt compare`` counts them for training), summed
over the processes, kept in each checkpoint (``xlt_kd.json``) so it is exact across resume, and written to
``report.json`` ``cpt.distill_flops``, which ``xlt compare`` charges to the arm.
"""

from __future__ import annotations

import gc
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from xlt.config import XltError
from xlt.log import logger

KD_STATE_FILE = "xlt_kd.json"  # teacher tokens so far, in each checkpoint


_log = logger("xlt cpt")


@dataclass(frozen=True)
class KdSettings:
    """The distillation term of one run (``steps`` already in optimizer steps)."""

    weight: float
    steps: int
    temperature: float = 1.0
    identity: bool = False  # tokenizer_mode none: same vocabulary, no expansion

    def active_at(self, global_step: int) -> bool:
        """Whether the optimizer step after ``global_step`` completed steps carries the term."""
        return global_step < self.steps

    def describe(self, max_steps: int) -> str:
        match = "same vocabulary" if self.identity else "new ids expanded into their old pieces, KL over the old ids"
        return (f"distillation from the base model: weight {self.weight:g}, temperature {self.temperature:g}, "
                f"first {self.steps} of {max_steps} steps ({match})")


def kd_settings(cpt_args: Any, tokenizer_mode: str, max_steps: int, use_lora: bool = False,
                launcher_kind: str = "single") -> Optional[KdSettings]:
    """The distillation settings, or None when ``kd_weight`` is 0; a one-line ``XltError`` for a run it cannot
    serve. Runs before any model loads."""
    w = cpt_args.kd_weight
    if not w:
        return None
    if tokenizer_mode == "swap":
        raise XltError(f"kd_weight={w}: not supported with tokenizer_mode swap (its new ids are not merges of the "
                       f"base's, so the base model cannot read the same text); use extend or none")
    if use_lora:
        raise XltError(f"kd_weight={w} is not supported with use_lora: remove it or set use_lora false")
    if launcher_kind == "deepspeed":
        raise XltError(f"kd_weight={w} is not supported under deepspeed (the teacher would be a full unsharded "
                       f"copy on every process); use FSDP, DDP or one process")
    steps = math.ceil(cpt_args.kd_fraction * max_steps)
    return KdSettings(weight=float(w), steps=int(steps), temperature=float(cpt_args.kd_temperature),
                      identity=tokenizer_mode == "none")


def new_token_pieces(base_spec: str, extended_dir: str) -> tuple[dict[int, list[int]], list[int]]:
    """``(pieces, old ids)``: each id of the extended tokenizer that the base lacks -> the base ids of its string
    (as the tokenizer stage computes them for the initialisation), and every id of the base tokenizer."""
    from tokenizers import Tokenizer

    from xlt.tokenizer.merges import read_tokenizer_json

    base = Tokenizer.from_str(json.dumps(read_tokenizer_json(base_spec)))
    new = Tokenizer.from_file(os.path.join(extended_dir, "tokenizer.json"))
    old_vocab = base.get_vocab(with_added_tokens=True)
    old_ids = set(old_vocab.values())
    pieces = {}
    for s, i in new.get_vocab(with_added_tokens=True).items():
        if i in old_ids:
            if old_vocab.get(s) != i:
                raise XltError(f"kd_weight: token id {i} means {s!r} in {extended_dir} but not in the base tokenizer; "
                               f"distillation needs an extension that keeps every old id")
            continue
        ps = [t.id for t in base.model.tokenize(s)]
        if not ps:
            raise XltError(f"kd_weight: new token {s!r} (id {i}) has no pieces in the base tokenizer")
        pieces[i] = ps
    return pieces, sorted(old_ids)


@dataclass
class KdBatch:
    """The teacher's inputs for one student micro-batch, and the aligned positions scored."""

    input_ids: torch.Tensor          # (B, Lt) old ids
    position_ids: torch.Tensor       # (B, Lt) per-segment positions
    student: tuple[torch.Tensor, torch.Tensor]  # (row, position) of each scored student position
    teacher: tuple[torch.Tensor, torch.Tensor]  # (row, position) of the aligned teacher position


class Aligner:
    """Expands student rows into teacher rows and pairs their positions (see the module docstring).

    ``pieces`` maps a new id to its old ids; ids without an entry are old ids and stand for themselves. The
    expansion is a table lookup (``rows x longest expansion``), so a batch is aligned with tensor ops only.
    """

    def __init__(self, pieces: dict[int, list[int]], rows: int, pad_id: int = 0) -> None:  # noqa: D107
        width = max((len(p) for p in pieces.values()), default=1)
        table = torch.full((rows, width), -1, dtype=torch.long)
        table[:, 0] = torch.arange(rows)
        lens = torch.ones(rows, dtype=torch.long)
        for i, ps in pieces.items():
            table[i, :] = -1
            table[i, :len(ps)] = torch.tensor(ps, dtype=torch.long)
            lens[i] = len(ps)
        self.table, self.lens, self.pad_id = table, lens, pad_id

    def align(self, input_ids: torch.Tensor, labels: torch.Tensor,
              position_ids: Optional[torch.Tensor] = None) -> KdBatch:
        """Teacher rows and the scored pairs of a ``(B, L)`` student batch.

        Guarantees: teacher row ``b`` is ``expand_ids(input_ids[b])`` followed by padding; student position ``i``
        (which predicts token ``i + 1``) is scored iff ``labels[b, i + 1] != -100``, paired with the teacher
        position of the last piece of token ``i``; teacher positions restart wherever the student's do.
        """
        dev = input_ids.device
        table, lens = self.table.to(dev), self.lens.to(dev)
        B, L = input_ids.shape
        n = lens[input_ids]                                        # (B, L) pieces per token
        ends = n.cumsum(1) - 1                                     # teacher index of each token's last piece
        first = ends - n + 1                                       # ... and of its first piece
        if position_ids is None:
            position_ids = torch.arange(L, device=dev).expand(B, L)
        position_ids = position_ids.expand(B, L)
        # A segment starts where transformers' packed-sequence detection starts one: a step other than +1.
        starts = torch.ones_like(input_ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        at = torch.where(starts, torch.arange(L, device=dev).expand(B, L), torch.zeros_like(input_ids))
        seg_start = at.cummax(1).values                            # index of each token's segment start
        base_pos = position_ids.gather(1, seg_start) + first - first.gather(1, seg_start)
        width = table.shape[1]
        j = torch.arange(width, device=dev)
        real = j < n[..., None]                                    # (B, L, width) real pieces
        tgt = (first[..., None] + j)[real]
        rows = torch.arange(B, device=dev)[:, None, None].expand(B, L, width)[real]
        t_len = int(n.sum(1).max())
        t_ids = torch.full((B, t_len), self.pad_id, dtype=torch.long, device=dev)
        t_ids[rows, tgt] = table[input_ids][real]
        # Padding: its own segment (positions from 0), after every real token.
        pad_len = t_len - n.sum(1, keepdim=True)
        t_pos = torch.arange(t_len, device=dev).expand(B, t_len) - (t_len - pad_len)
        t_pos = t_pos.clone()
        t_pos[rows, tgt] = (base_pos[..., None] + j).expand(B, L, width)[real]
        scored = labels[:, 1:] != -100                             # position i predicts token i + 1
        b, i = scored.nonzero(as_tuple=True)
        return KdBatch(t_ids, t_pos, (b, i), (b, ends[b, i]))


def kd_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, batch: KdBatch,
           old_ids: Optional[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """``T^2 x sum`` over the scored positions of ``KL(teacher || student)``, both softmaxes at temperature ``T``
    over ``old_ids`` only (all columns when None). Differentiable in ``student_logits``; fp32 arithmetic."""
    s = student_logits[batch.student]
    t = teacher_logits[batch.teacher]
    if old_ids is not None:
        s, t = s.index_select(-1, old_ids), t.index_select(-1, old_ids)
    log_s = torch.log_softmax(s.float() / temperature, dim=-1)
    log_t = torch.log_softmax(t.float() / temperature, dim=-1)
    kl = torch.nn.functional.kl_div(log_s, log_t, log_target=True, reduction="sum")
    return kl * (temperature ** 2)


def shard_teacher(teacher: Any) -> None:
    """Shard the frozen teacher over every process with FSDP2's ``fully_shard``: each decoder layer (the classes
    transformers names in ``_no_split_modules``, as accelerate's transformer-based wrap picks them), then the root.
    A collective: every process calls it. The parameters become dim-0 DTensor shards on the default device mesh
    (moved to this process's accelerator when there is one); the dtype is kept (no mixed-precision cast)."""
    from torch.distributed.fsdp import fully_shard

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return  # one process: nothing to shard across
    layer_classes = set(getattr(teacher, "_no_split_modules", None) or ())
    layers = [m for m in teacher.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise XltError(f"kd_weight under FSDP: {type(teacher).__name__} names no decoder layer class "
                       f"(_no_split_modules) to shard the teacher by")
    for layer in layers:
        fully_shard(layer)
    # The root too: FSDP2 keeps a root's parameters gathered after forward (None = True for layers only), and a
    # teacher has no backward that would reshard them.
    fully_shard(teacher, reshard_after_forward=True)


class Distiller:
    """The teacher, the alignment and the compute count of one process."""

    def __init__(self, settings: KdSettings, teacher: Any, aligner: Optional[Aligner],  # noqa: D107
                 old_ids: Optional[list[int]], n_teacher: int) -> None:
        self.settings = settings
        self.teacher = teacher
        self.aligner = aligner
        self.old_ids = torch.tensor(old_ids, dtype=torch.long) if old_ids is not None else None
        self.n_teacher = n_teacher
        self.local_tokens = 0    # teacher tokens this process read since it started
        self.resumed_tokens = 0  # all processes' teacher tokens before the resumed checkpoint

    @classmethod
    def build(cls, settings: KdSettings, base_spec: str, model_dir: str, student_rows: int, dtype: str,
              attn: Optional[str], trust_remote_code: bool = False, load_teacher: bool = True,
              shard: bool = False) -> Distiller:
        """Load the teacher (frozen, eval mode, ``dtype``) and the vocabulary match of ``model_dir``.

        ``load_teacher=False`` (a run resumed past the window): only the compute count, no teacher.
        ``shard=True`` (an FSDP launch; every process must call it): the teacher is sharded with ``fully_shard``.
        ``N_teacher`` is read from the base model's config (``xlt compare``'s ``n_eff``)."""
        from xlt.flops import model_effective_params
        from xlt.models import load_model, resolve_model

        n_teacher = int(model_effective_params(resolve_model(base_spec), trust_remote_code)["n_eff"])
        if not load_teacher:
            return cls(settings, None, None, None, n_teacher)
        aligner, old_ids = None, None
        if not settings.identity:
            pieces, old = new_token_pieces(base_spec, model_dir)
            aligner = Aligner(pieces, student_rows, pad_id=old[0])
        teacher = load_model(base_spec, dtype, attn, trust_remote_code)
        teacher.eval()
        teacher.requires_grad_(False)
        teacher.config.use_cache = False
        if shard:
            shard_teacher(teacher)
        if aligner is not None:
            rows = int(teacher.get_input_embeddings().weight.shape[0])
            old_ids = [i for i in old if i < rows]
        return cls(settings, teacher, aligner, old_ids, n_teacher)

    def release(self) -> None:
        """Free the teacher (after the last step of the window)."""
        if self.teacher is None:
            return
        self.teacher = None
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
                torch.distributed.get_rank() == 0:
            _log(f"distillation: done after step {self.settings.steps}; teacher released")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def kd_sum(self, student_logits: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, int]:
        """``(T^2 x summed KL over the scored positions, scored positions)`` of one micro-batch."""
        ids, labels, pos = inputs["input_ids"], inputs["labels"], inputs.get("position_ids")
        dev = ids.device
        if self.aligner is None:  # identity: the teacher reads the student's row
            if pos is None:
                pos = torch.arange(ids.shape[1], device=dev).expand_as(ids)
            scored = labels[:, 1:] != -100
            b, i = scored.nonzero(as_tuple=True)
            batch = KdBatch(ids, pos, (b, i), (b, i))
        else:
            batch = self.aligner.align(ids, labels, pos)
        if next(self.teacher.parameters()).device != dev:
            self.teacher.to(dev)
        with torch.no_grad():
            out = self.teacher(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
        self.local_tokens += int(batch.input_ids.numel())
        old = self.old_ids.to(dev) if self.old_ids is not None else None
        return kd_sum(student_logits, out.logits, batch, old, self.settings.temperature), int(batch.student[0].numel())

    # -- compute accounting --------------------------------------------------------------------
    def total_tokens(self) -> int:
        """Teacher tokens of the whole run so far (every process). A collective: call it on every process."""
        n = torch.tensor([self.local_tokens], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_backend() == "nccl":
                n = n.cuda()
            torch.distributed.all_reduce(n)
        return self.resumed_tokens + int(n.item())

    def flops(self, tokens: int) -> float:
        return float(2 * self.n_teacher * tokens)

    def state(self) -> dict:
        """What a checkpoint keeps (a collective: every process calls it)."""
        tokens = self.total_tokens()
        return {"teacher_tokens": tokens, "teacher_params": self.n_teacher, "distill_flops": self.flops(tokens)}

    def load(self, checkpoint: str) -> None:
        """Continue the count of a resumed checkpoint (one written without distillation counts 0)."""
        path = os.path.join(checkpoint, KD_STATE_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                self.resumed_tokens = int(json.load(f)["teacher_tokens"])
        self.local_tokens = 0


def kd_loss_term(distiller: Distiller, logits: torch.Tensor, inputs: dict, num_items_in_batch: Optional[Any],
                 processes: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``kd_weight`` x one micro-batch's distillation term, and ``[summed KL, scored positions]`` for the log.

    Normalised as the Trainer normalises the LM loss: by ``num_items_in_batch`` (the scored tokens of the whole
    accumulated step over every process; pass None where the model takes no loss kwargs), times ``processes`` when
    the Trainer averages tokens across devices; otherwise as a micro-batch mean, which the Trainer then divides by
    the accumulation steps. Either way the step's term is the mean over its scored positions.
    """
    total, n = distiller.kd_sum(logits, inputs)
    if num_items_in_batch is not None:
        term = total / num_items_in_batch
        if processes:
            term = term * processes
    else:
        term = total / max(n, 1)
    acc = torch.stack([total.detach().double(), torch.tensor(float(n), dtype=torch.float64, device=total.device)])
    return distiller.settings.weight * term, acc
