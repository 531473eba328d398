"""Recipe configuration: one set of dataclasses, read from YAML with command-line overrides.

Every recipe key is documented once, here. Recipes are parsed with TRL's ``TrlParser`` (the YAML
file gives defaults, the command line wins, an unknown key is an error) and then validated
before any model or dataset is loaded, so bad input costs seconds, not a model load.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from xlt import validate
from xlt.errors import XltError  # noqa: F401 (the historical import path: xlt.config.XltError)
from xlt.precision import resolve_precision

EMBEDDED_MODEL = "smollm2-135m"




# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    """Which model to start from and how to load it."""

    model: str = field(
        default=EMBEDDED_MODEL,
        metadata={"help": "Model spec: a hub id, a local directory, or the embedded alias 'smollm2-135m'."},
    )
    model_revision: Optional[str] = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modelling code from the hub. Off by default (security)."}
    )
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "Dtype the weights are loaded in for inference ('auto', 'bfloat16', 'float32'). Training "
                  "loads them in `master_weights_dtype` instead; 'bfloat16' here without `master_weights_dtype: "
                  "bfloat16` is refused (it would silently train pure bf16)."},
    )
    attn_implementation: Optional[str] = field(
        default=None,
        metadata={"help": "'auto' (flash_attention_2 on a GPU when the flash-attn package imports, else sdpa), "
                  "'flash_attention_2', 'flash_attention_3', 'sdpa' (the default), 'flex_attention' or 'eager'. "
                  "Checked before any work; the one used is logged. Packed rows keep per-document attention "
                  "under each of them."},
    )
    master_weights_dtype: str = field(
        default="float32",
        metadata={"help": "Dtype of the weights the optimizer updates. 'float32' (default): fp32 master weights; "
                  "with `bf16: true` the forward/backward runs in bf16 (autocast, or FSDP2's mixed-precision "
                  "policy). 'bfloat16': pure-bf16 training, asked for by name (most small updates round to "
                  "nothing at LR 1e-5; a warning is printed)."},
    )
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={"help": "Dtype of the final model's tensors (and config.json's dtype). 'auto': the base model's "
                  "config dtype (bfloat16 for hub models; float32 for the embedded SmolLM2, materialised from GGUF "
                  "in fp32; float32 when the config names none); 'float32' keeps the fp32 master weights."},
    )
    compile_blocks: bool = field(
        default=False,
        metadata={"help": "torch.compile each transformer block (accelerate's regional compilation: one block's "
                  "compile serves every layer; under FSDP2 in place, before sharding). Inductor backend unless "
                  "torch_compile_backend says otherwise; on a CPU it needs a C++ compiler (checked)."},
    )
    activation_checkpointing_every: int = field(
        default=0,
        metadata={"help": "Selective activation checkpointing: checkpoint decoder layers 0, k, 2k, ... (k >= 1; 1 = "
                  "every layer; 0: off, activation_checkpointing decides). Same mechanism under DDP, one process "
                  "and FSDP2 (transformers' per-layer switch); replaces activation_checkpointing when set."},
    )
    float8: bool = field(
        default=False,
        metadata={"help": "float8 training of the block linears through torchao (dynamic tensorwise scaling; the "
                  "output head stays bf16). Opt-in; needs torchao and an H100-class GPU (compute capability >= "
                  "8.9): refused in one line by xlt check and before the model loads otherwise."},
    )


# ---------------------------------------------------------------------------------------------
# Tokenizer extension / swap
# ---------------------------------------------------------------------------------------------
EMBEDDING_INITS = ("subword_mean", "merge_tree", "mean", "random", "distill", "align")
OUTPUT_EMBEDDING_INITS = ("same", "first_subtoken", "char_weighted_mean", "calibrated_first_subtoken")


@dataclass
class TokenizerArguments:
    """Extending or swapping the base tokenizer with Japanese vocabulary (real BPE merges)."""

    tokenizer_mode: str = field(
        default="none",
        metadata={"help": "'none' keeps the base tokenizer; 'extend' appends new Japanese merges after the "
                  "original ones; 'swap' replaces the tokenizer with one trained on Japanese + English."},
    )
    new_tokens: int = field(default=0, metadata={"help": "How many new tokens to learn (extend), or the vocab size (swap)."})
    tokenizer_corpus: Optional[list[dict]] = field(
        default=None,
        metadata={"help": "Source specs (same form as `sources`) to learn merges from. Default: the Japanese "
                  "`sources` of the recipe."},
    )
    tokenizer_max_chars: int = field(
        default=5_000_000, metadata={"help": "Characters of the corpus read for merge training (a cap, for speed)."}
    )
    min_frequency: int = field(default=2, metadata={"help": "Minimum pair frequency for a new merge."})
    max_token_chars: int = field(default=16, metadata={"help": "Longest new token, in characters."})
    tokenizer_nfkc: bool = field(default=False, metadata={"help": "NFKC-normalise the corpus before learning merges."})
    mecab: bool = field(
        default=False, metadata={"help": "Split on MeCab (fugashi + unidic-lite) word boundaries so merges do not cross words."}
    )
    pad_vocab_multiple: int = field(default=64, metadata={"help": "Pad the embedding matrix to a multiple of this."})
    embedding_init: str = field(
        default="subword_mean",
        metadata={"help": "Initialisation of new embedding rows: 'subword_mean' (mean of the old rows of the token's "
                  "pieces), 'merge_tree' (bottom-up in merge order: the mean of the rows of the two tokens each new "
                  "token merges), 'mean' (the old mean row), 'random', or 'distill' (subword_mean, then each new "
                  "input row is fitted so the base model's last hidden state at the new token matches the one at its "
                  "last piece on corpus text; its compute is reported as init_flops), or 'align' (Yamaguchi et al. "
                  "2024: the frequency-weighted mean of the old rows of the old tokens each occurrence of the new "
                  "token overlaps by character offsets on the tokenizer corpus; a token the corpus never shows gets "
                  "subword_mean). distill: extend mode only."},
    )
    output_embedding_init: str = field(
        default="same",
        metadata={"help": "New rows of an untied output head: 'same' (as embedding_init), 'first_subtoken' (the "
                  "output row of the token's first piece, as EEVE) or 'char_weighted_mean' (the mean of its "
                  "pieces' output rows weighted by their lengths in characters) or 'calibrated_first_subtoken' (the "
                  "first piece's row plus a bias worth the base model's mean log-probability of the other pieces after "
                  "it, measured on the tokenizer corpus; its forward passes are charged as init_flops). Other than "
                  "'same' needs an untied "
                  "model: untie_embeddings: true for a tied one (SmolLM2)."},
    )
    untie_embeddings: bool = field(
        default=False,
        metadata={"help": "Untie a tied model before resizing: the output head gets its own copy of the embedding "
                  "matrix (identical logits) and config.tie_word_embeddings becomes false. No-op on an untied model."},
    )
    distill_steps: int = field(
        default=40,
        metadata={"help": "embedding_init: distill: Adam steps over the new input rows (body frozen), each on a "
                  "batch of 4 windows of 16 tokens (about a minute for SmolLM2-135M on 2 CPU cores)."},
    )
    tokenizer_num_proc: Optional[int] = field(
        default=None,
        metadata={"help": "Processes that segment the corpus with MeCab (mecab: true) when learning merges. "
                  "Default: the CPUs available, at most 16. The learned merges do not depend on it."},
    )

    def __post_init__(self) -> None:
        """The initialisation keys, checked at parse time (before any model loads)."""
        self.check_init_keys()

    def check_init_keys(self) -> None:
        """One-line ``XltError`` for a bad embedding_init / output_embedding_init / distill_steps combination.

        The one place these keys are validated (``check_tokenizer_inputs`` calls it again, for an object
        changed after construction). Whether the model is tied is a property of the model, checked there.
        """
        if self.embedding_init not in EMBEDDING_INITS:
            raise XltError(f"embedding_init={self.embedding_init!r}: expected one of {', '.join(EMBEDDING_INITS)}")
        if self.output_embedding_init not in OUTPUT_EMBEDDING_INITS:
            raise XltError(f"output_embedding_init={self.output_embedding_init!r}: expected one of "
                           f"{', '.join(OUTPUT_EMBEDDING_INITS)}")
        if type(self.distill_steps) is not int or self.distill_steps < 1:
            raise XltError(f"distill_steps={self.distill_steps}: expected an integer >= 1")
        if self.embedding_init == "distill" and self.tokenizer_mode == "swap":
            raise XltError("embedding_init=distill: supported with tokenizer_mode=extend only (a swapped tokenizer "
                           "shares no segmentation with the base to distil from)")


# ---------------------------------------------------------------------------------------------
# Data: sources, mixture, curriculum, packing
# ---------------------------------------------------------------------------------------------
@dataclass
class DataArguments:
    """The continued-pretraining stream: sources, Japanese-ratio curriculum, packing, cleaning."""

    sources: Optional[list[dict]] = field(
        default=None,
        metadata={"help": "List of source specs. Each is a mapping with `name`, `lang` ('ja' or 'en'), and one of "
                  "`embedded` (e.g. 'hironsan', 'chatterbot-ja', 'chatterbot-en'), `path` (jsonl / parquet / txt, "
                  "globs allowed) or `dataset` (hub id, streamed; with optional `config`, `split`). Optional: "
                  "`text_field` (default 'text'), `weight` (within its language; default: proportional to size "
                  "when known, else equal), `domain`, `max_docs`, `holdout` (fraction kept out for evaluation)."},
    )
    eval_sources: Optional[list[dict]] = field(
        default=None,
        metadata={"help": "Held-out text for bits-per-character evaluation, same spec form. Default: the "
                  "`holdout` part of each source."},
    )
    seq_len: int = field(default=2048, metadata={"help": "Packed row length in tokens (the final sequence length)."})
    ja_schedule: str = field(
        default="linear",
        metadata={"help": "Japanese-ratio schedule over tokens trained: 'constant', 'linear', 'step', 'cosine', "
                  "'piecewise'."},
    )
    ja_ratio_start: float = field(default=0.5, metadata={"help": "Japanese share of tokens at the start."})
    ja_ratio_end: float = field(default=0.9, metadata={"help": "Japanese share at the end of the ramp."})
    ja_ramp_fraction: float = field(
        default=1.0, metadata={"help": "linear/cosine: fraction of the run over which the ratio ramps; step: the "
                               "fraction of the run at which it switches from start to end."},
    )
    ja_points: Optional[str] = field(
        default=None,
        metadata={"help": "piecewise: 'fraction:ratio,...' points, fractions of the run increasing from 0 to 1, "
                  "e.g. '0:0.3,0.8:0.3,0.8:0.6,1:0.6'."},
    )
    slw_min_len: Optional[int] = field(
        default=None, metadata={"help": "Sequence-length warmup: starting length (multiple of 8). None disables SLW."}
    )
    slw_fraction: float = field(default=0.1, metadata={"help": "SLW: fraction of the run over which length grows."})
    slw_schedule: str = field(default="linear", metadata={"help": "SLW growth: 'linear' or 'root'."})
    max_epochs_warning: float = field(
        default=4.0, metadata={"help": "Warn when a source would be repeated more than this many epochs."}
    )
    clean_nfkc: bool = field(default=False, metadata={"help": "NFKC-normalise Japanese documents."})
    clean_min_chars: int = field(default=1, metadata={"help": "Drop documents shorter than this (characters)."})
    clean_min_ja_share: float = field(
        default=0.0, metadata={"help": "Drop 'ja' documents whose share of Japanese script is below this."}
    )
    clean_dedup: bool = field(default=True, metadata={"help": "Drop exact duplicate documents within a source."})
    stream_seed: int = field(default=0, metadata={"help": "Seed of the stream (shuffles of every source). Named so as "
                             "not to clash with TrainingArguments.data_seed."})
    data_source: str = field(
        default="shards", metadata={"help": "'shards': every rank reads its own rows by index from token shards "
                                    "(xlt data prepare; prepared first, on one process, when missing); 'stream': "
                                    "the in-memory stream (process 0 reads, cleans and tokenizes during training)."})
    prepared_dir: Optional[str] = field(
        default=None, metadata={"help": "data_source shards: the prepared folder (default OUTPUT_DIR/data)."})


# ---------------------------------------------------------------------------------------------
# Continued pretraining extras (TrainingArguments holds the optimiser / schedule / precision)
# ---------------------------------------------------------------------------------------------
@dataclass
class CptArguments:
    """Settings of continued pretraining beyond transformers' TrainingArguments."""

    train_tokens: Optional[int] = field(
        default=None,
        metadata={"help": "Tokens to train on; sets max_steps = train_tokens / tokens_per_step (rounded up)."},
    )
    spike_factor: float = field(
        default=0.0,
        metadata={"help": "Spike guard, ratio rule: skip the update when the step's loss (averaged over all "
                  "processes) > factor x its mean over the last skip_step_window taken steps (0 disables; else > 1)."},
    )
    eval_max_docs: int = field(default=200, metadata={"help": "Held-out documents per language for bits per character."})
    resume: bool = field(default=True, metadata={"help": "Resume when OUTPUT_DIR holds the same run's checkpoints."})
    # Spike guard (xlt/train/skip_step.py). Every rule judges values all-reduced over the processes, so all
    # ranks skip together; a skipped step leaves weights and optimizer state untouched. Not under DeepSpeed.
    skip_step_sigma: float = field(
        default=6.0,
        metadata={"help": "Spike guard, z-score rule: skip the update when the step's loss or gradient norm is "
                  "more than this many standard deviations above its mean over the last skip_step_window taken "
                  "steps (0 disables)."},
    )
    skip_step_window: int = field(
        default=128, metadata={"help": "Spike guard: how many recent taken steps the mean and deviation are over."}
    )
    skip_step_min_history: int = field(
        default=64,
        metadata={"help": "Spike guard: the z-score and ratio rules wait for this many taken steps (>= 2, <= "
                  "skip_step_window; default half the window, as OLMo-core: early-run loss and grad-norm swings "
                  "are not spikes). Non-finite steps are skipped from the first step."},
    )
    max_consecutive_skips: int = field(
        default=10,
        metadata={"help": "Spike guard: after this many skipped steps in a row, save a checkpoint and stop with "
                  "an error naming the step (0: never stop)."},
    )
    skip_nonfinite: bool = field(
        default=True,
        metadata={"help": "Spike guard: always skip a step whose loss or gradient is NaN / inf (on any process)."},
    )
    loss_by_language_steps: int = field(
        default=10,
        metadata={"help": "Every this many optimizer steps, the loss of each language (loss_ja / loss_en in the "
                  "logs) is measured on that step's micro-batches from the logits the forward pass made anyway "
                  "(one extra cross-entropy; reported at the next log). 0 disables it."},
    )

    # New embedding rows of an extended / swapped tokenizer (xlt/train/new_rows.py). They need tokenizer_mode
    # extend or swap, full training (not use_lora) and optim adamw_torch / adamw_torch_fused when not at defaults.
    new_rows_lr_multiplier: float = field(
        default=1.0,
        metadata={"help": "The new rows (input embedding and untied output head) step as their own AdamW group with "
                  "learning_rate x this (> 0); the LR schedule applies to it too."},
    )
    new_rows_weight_decay: float = field(
        default=0.0,
        metadata={"help": "Decoupled weight decay of the new rows (>= 0); the old rows keep weight_decay."},
    )
    new_rows_warmup_fraction: float = field(
        default=0.0,
        metadata={"help": "For the first ceil(fraction x max_steps) optimizer steps only the new rows train: the body "
                  "and every old row stay bit-identical and their Adam state does not advance (0 <= x < 1)."},
    )
    # Partial training (xlt/train/partial.py): one process, full training (not use_lora). 2x2 LS: first 2, last 2,
    # fraction 1; 2-stage: first 0, last 0, fraction 0.5. xlt compare charges the phase its real FLOPs.
    train_layers_first: int = field(
        default=0,
        metadata={"help": "Partial training: the first this many decoder layers train in the partial phase, with the "
                  "input embedding and the output head (>= 0; needs partial_training_fraction > 0)."},
    )
    train_layers_last: int = field(
        default=0,
        metadata={"help": "Partial training: the last this many decoder layers train in the partial phase (>= 0)."},
    )
    partial_training_fraction: float = field(
        default=0.0,
        metadata={"help": "Partial training: for the first ceil(fraction x max_steps) optimizer steps only the "
                  "embeddings, the head and the train_layers_first / train_layers_last layers train (everything "
                  "else frozen: no gradient, Adam state untouched), then everything (0 <= x <= 1; 0: off, 1: the "
                  "whole run)."},
    )
    # Distillation from the base model early in training (xlt/train/kd.py): tokenizer_mode extend or none,
    # full training, one process or DDP.
    kd_weight: float = field(
        default=0.0,
        metadata={"help": "Loss = LM loss + kd_weight x T^2 KL(base model || this model) over the old ids, the base "
                  "model reading the same text in its own tokens (new ids expanded into their old pieces), for "
                  "the first kd_fraction of the steps (>= 0; 0: off). Its FLOPs are reported as cpt.distill_flops."},
    )
    kd_fraction: float = field(
        default=0.1,
        metadata={"help": "The first ceil(kd_fraction x max_steps) optimizer steps carry the distillation term "
                  "(0 < x <= 1)."},
    )
    kd_temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature T of both distributions in the distillation term (> 0)."}
    )
    loss_implementation: str = field(
        default="auto",
        metadata={"help": "How the LM loss is computed (xlt/train/losses.py): 'chunked' (pure torch, from the last "
                  "hidden states a chunk of positions at a time: never the whole fp32 logits), 'liger' "
                  "(liger-kernel's fused linear cross-entropy, CUDA), 'model' (the model's own loss from full "
                  "logits), 'auto' (liger on a CUDA GPU when liger-kernel imports, else chunked). Steps carrying "
                  "the distillation term use the logits path."},
    )

    def __post_init__(self) -> None:
        """The spike-guard and new-row keys, checked at parse time (before any model loads)."""
        if not (isinstance(self.new_rows_lr_multiplier, (int, float)) and 0 < self.new_rows_lr_multiplier < math.inf):
            raise XltError(f"new_rows_lr_multiplier={self.new_rows_lr_multiplier}: expected a number > 0")
        if not (isinstance(self.new_rows_weight_decay, (int, float)) and 0 <= self.new_rows_weight_decay < math.inf):
            raise XltError(f"new_rows_weight_decay={self.new_rows_weight_decay}: expected a number >= 0")
        if not (isinstance(self.new_rows_warmup_fraction, (int, float)) and 0 <= self.new_rows_warmup_fraction < 1):
            raise XltError(f"new_rows_warmup_fraction={self.new_rows_warmup_fraction}: expected 0 <= x < 1")
        if not (isinstance(self.kd_weight, (int, float)) and 0 <= self.kd_weight < math.inf):
            raise XltError(f"kd_weight={self.kd_weight}: expected a number >= 0 (0: off)")
        if not (isinstance(self.kd_fraction, (int, float)) and 0 < self.kd_fraction <= 1):
            raise XltError(f"kd_fraction={self.kd_fraction}: expected 0 < x <= 1")
        if not (isinstance(self.kd_temperature, (int, float)) and 0 < self.kd_temperature < math.inf):
            raise XltError(f"kd_temperature={self.kd_temperature}: expected a number > 0")
        if self.loss_implementation not in ("auto", "chunked", "liger", "model"):
            raise XltError(f"loss_implementation={self.loss_implementation!r}: expected auto, chunked, liger or model")
        if self.spike_factor != 0 and not self.spike_factor > 1:
            raise XltError(f"spike_factor={self.spike_factor}: expected 0 (off) or a factor > 1")
        if not self.skip_step_sigma >= 0:
            raise XltError(f"skip_step_sigma={self.skip_step_sigma}: expected >= 0 (0 disables)")
        if self.skip_step_window < 2:
            raise XltError(f"skip_step_window={self.skip_step_window}: expected >= 2")
        if not 2 <= self.skip_step_min_history <= self.skip_step_window:
            raise XltError(f"skip_step_min_history={self.skip_step_min_history}: expected between 2 and "
                           f"skip_step_window={self.skip_step_window}")
        if self.max_consecutive_skips < 0:
            raise XltError(f"max_consecutive_skips={self.max_consecutive_skips}: expected >= 0 (0: never stop)")


NEW_ROW_MODES = ("trainable_tokens", "modules_to_save")
ALL_LINEAR = "all-linear"


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
@dataclass
class LoraSettings:
    """LoRA recipe keys. Validated on construction; every error is one line naming the key."""

    # Checked and normalised by __post_init__ (a comma-separated string becomes a list): not type-checked again.
    normalised_keys: typing.ClassVar[tuple[str, ...]] = ("lora_target_modules",)

    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights (SFT: the final "
                           "sft/ model is saved merged; learning rate default 2e-4 with LoRA, 2e-5 without)."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank (> 0)."})
    lora_alpha: float = field(default=128, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    lora_target_modules: str = field(  # a YAML list is accepted too (normalised in __post_init__)
        default=ALL_LINEAR,
        metadata={"help": "Linear module names to adapt, comma-separated (e.g. q_proj,v_proj), or 'all-linear' (every "
                  "linear layer except the output head)."},
    )
    lora_new_rows: str = field(
        default="trainable_tokens",
        metadata={"help": "How the new vocabulary rows train: 'trainable_tokens' (only those rows of the embedding "
                  "and untied head; tiny memory) or 'modules_to_save' (the whole embedding and head)."},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.use_lora, bool):
            raise XltError(f"use_lora: expected true or false, got {self.use_lora!r}")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r <= 0:
            raise XltError(f"lora_r: expected a positive integer, got {self.lora_r!r}")
        if (isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float))
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0):
            raise XltError(f"lora_alpha: expected a positive number, got {self.lora_alpha!r}")
        if (isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float))
                or not 0.0 <= self.lora_dropout < 1.0):
            raise XltError(f"lora_dropout: expected a number in [0, 1), got {self.lora_dropout!r}")
        self.lora_target_modules = _normalise_targets(self.lora_target_modules)
        if self.lora_new_rows not in NEW_ROW_MODES:
            raise XltError(f"lora_new_rows: expected one of {', '.join(NEW_ROW_MODES)}, got {self.lora_new_rows!r}")


def _normalise_targets(value: Any) -> Any:
    """'all-linear', or a non-empty list of distinct non-empty names (a comma-separated string is split)."""
    if isinstance(value, str):
        if value.strip() == ALL_LINEAR:
            return ALL_LINEAR
        value = [v.strip() for v in value.split(",")]
    if not isinstance(value, (list, tuple)) or not value:
        raise XltError(f"lora_target_modules: expected a list of module names or '{ALL_LINEAR}', got {value!r}")
    names = []
    for v in value:
        if not isinstance(v, str) or not v.strip() or v.strip() == ALL_LINEAR:
            raise XltError(f"lora_target_modules: expected module names or '{ALL_LINEAR}' alone, got {list(value)!r}")
        if v.strip() not in names:
            names.append(v.strip())
    return names


@dataclass
class SftArguments(LoraSettings):
    """Instruction tuning data and format."""

    model: str = field(default="", metadata={"help": "Model spec to fine-tune (default: OUTPUT_DIR/cpt)."})
    sft_datasets: Optional[list[dict]] = field(
        default=None,
        metadata={"help": "List of instruction sets: each a mapping with `adapter` ('alpaca', 'dolly', "
                  "'hh_rlhf', 'chatterbot') and `dataset` (hub id) or `path` (jsonl) or `embedded`; "
                  "optional `split`, `max_examples`."},
    )
    prompt_format: str = field(
        default="stablelm_alpaca",
        metadata={"help": "'stablelm_alpaca' (Japanese StableLM Alpaca prompt) or 'chat' (the tokenizer's chat template)."},
    )
    model_revision: Optional[str] = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    torch_dtype: str = field(default="auto", metadata={"help": "See ModelArguments.torch_dtype."})
    attn_implementation: Optional[str] = field(default=None, metadata={"help": "See ModelArguments.attn_implementation."})
    master_weights_dtype: str = field(default="float32", metadata={"help": "See ModelArguments.master_weights_dtype."})
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "See ModelArguments.save_dtype ('auto': the dtype of the model SFT starts "
                                  "from, e.g. the cpt/ folder)."})
    compile_blocks: bool = field(default=False, metadata={"help": "See ModelArguments.compile_blocks."})
    activation_checkpointing_every: int = field(
        default=0, metadata={"help": "See ModelArguments.activation_checkpointing_every."})
    float8: bool = field(default=False, metadata={"help": "See ModelArguments.float8."})
    # trust_remote_code comes from SFTConfig (default False).
    eval_fraction: float = field(
        default=0.0,
        metadata={"help": "Fraction of the instruction examples held out for evaluation, in [0, 1). > 0: the eval "
                  "loss is measured at the end of every epoch (logs and report.json sft.eval_loss)."},
    )
    chat_template: Optional[str] = field(
        default=None,
        metadata={"help": "prompt_format chat only: null uses the tokenizer's own template; 'chatml' installs a "
                  "ChatML template (adding <|im_start|>/<|im_end|> as special tokens when missing)."},
    )

    def __post_init__(self) -> None:
        """The SFT-only keys, checked at parse time (before any model loads); LoRA keys by LoraSettings."""
        if isinstance(self.eval_fraction, bool) or not isinstance(self.eval_fraction, (int, float)) \
                or not 0.0 <= self.eval_fraction < 1.0:
            raise XltError(f"eval_fraction={self.eval_fraction}: expected a number in [0, 1)")
        if self.chat_template not in (None, "chatml"):
            raise XltError(f"chat_template={self.chat_template!r}: expected null (the tokenizer's own) or chatml")
        super().__post_init__()

    def lora_settings(self) -> LoraSettings:
        """The LoRA keys alone (validated when this recipe was parsed)."""
        return LoraSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LoraSettings)})


def parse_recipe(dataclass_types: Sequence[type], argv: Optional[Sequence[str]] = None,
                 device_free: bool = False, precision: Optional[str] = None) -> tuple[Any, ...]:
    """Parse ``--config FILE`` plus command-line overrides into the given dataclasses.

    TrlParser does the merging (YAML gives defaults, the command line wins) and rejects unknown keys;
    we turn its exceptions into one-line ``XltError``s that name the key or file. Every value is
    checked against its annotation and range (``xlt.validate``): the YAML ones before TrlParser
    builds the dataclasses (argparse does not convert non-string defaults, and TrainingArguments'
    ``__post_init__`` would meet a bad value first), all of them after; the output directory too.

    Precision (TrainingArguments / SFTConfig among the types): a recipe that sets neither ``bf16`` nor
    ``fp16`` gets the precision of the device it runs on (``xlt.precision.resolve_precision``), or
    ``precision`` ('bf16' / 'fp32') when the caller decides for other hardware (``xlt check``); the
    decision is ``training_args.xlt_precision``. ``device_free``: the arguments are built for a command that
    reads the tokenizer only (no training), with ``use_cpu`` forced so that no device check runs.
    """
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    mapping: dict = {}
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise XltError("--config needs a file")
        path = argv[i + 1]
        if not os.path.isfile(path):
            raise XltError(f"recipe file not found: {path}")
        mapping = read_recipe_yaml(path)
        validate.check_recipe_mapping(mapping, dataclass_types)
    decision = None
    if any(hasattr(t, "bf16") and hasattr(t, "use_cpu") for t in dataclass_types):
        argv, decision = _settle_precision(argv, mapping, device_free, precision)
    parser = TrlParser(tuple(dataclass_types))

    def error(message: str) -> None:  # argparse would print the whole usage and exit
        raise XltError(message.replace("argument ", "", 1))

    parser.error = error  # type: ignore[method-assign]
    try:
        parsed = tuple(parser.parse_args_and_config(argv))
    except ValueError as e:
        msg = str(e)
        if "Unknown arguments from config file" in msg:
            keys = [s[2:] for s in msg.split("[", 1)[1].split("]", 1)[0].replace("'", "").split(", ") if s.startswith("--")]
            raise XltError(f"unknown recipe key(s) {', '.join(keys)} in {argv[argv.index('--config') + 1]}") from None
        if "not used by the HfArgumentParser" in msg:
            keys = [s for s in msg.split("[", 1)[1].rstrip("]").replace("'", "").split(", ") if s.startswith("--")]
            raise XltError(f"unknown option(s) {', '.join(keys) or msg}") from None
        raise XltError(msg.splitlines()[0]) from None
    validate.check_parsed(parsed)
    if decision is not None:
        for args in parsed:
            if hasattr(args, "bf16") and hasattr(args, "use_cpu"):
                args.xlt_precision = decision
    return parsed


def recipe_value(argv: Sequence[str], mapping: dict, key: str, default: Any = None) -> Any:
    """The value ``key`` is given on the command line (the last one wins) or else in the recipe mapping.

    Parsed dataclasses cannot tell a key left out from one set to its default; this can.
    """
    found = mapping.get(key, default)
    for i, a in enumerate(argv):
        if a == f"--{key}" and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith(f"--{key}="):
            found = a.split("=", 1)[1]
    return found


def _settle_precision(argv: list[str], mapping: dict, device_free: bool,
                      precision: Optional[str]) -> tuple[list[str], Optional[dict]]:
    """``argv`` with the precision made explicit, and the decision ({'precision', 'source'}) or None."""
    if device_free:
        return argv + ["--use_cpu", "true"], None
    given = {k: recipe_value(argv, mapping, k) for k in ("bf16", "fp16")}
    use_cpu = recipe_value(argv, mapping, "use_cpu", False)
    decision = resolve_precision(given, use_cpu, precision)
    if decision["source"] != "recipe":
        argv = argv + ["--bf16", str(decision["precision"] == "bf16").lower(), "--fp16", "false"]
    return argv, decision


def read_recipe_yaml(path: str) -> dict:
    """The recipe's YAML mapping; one-line errors for a file that is not UTF-8, not YAML, or not a mapping."""
    import yaml

    with open(path, "rb") as f:
        text = validate.decode_text(f.read(), path, "recipe")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise XltError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise XltError(f"{path}: a recipe must be a YAML mapping of key: value")
    return data


def validate_data_args(args: DataArguments) -> None:
    """Every data key that can be checked without reading data, in this one place: ranges
    (``validate.RULES``), choices (``validate.CHOICES``), and the rules between keys (``slw_min_len`` <=
    ``seq_len``; the piecewise schedule's ``ja_points``); one ``XltError`` line naming the key."""
    for f in dataclasses.fields(DataArguments):
        value = getattr(args, f.name, None)
        error = validate.range_error(f.name, value) or validate.choice_error(f.name, value)
        if error:
            raise XltError(error)
    if args.slw_min_len is not None and args.slw_min_len > args.seq_len:
        raise XltError(f"slw_min_len={args.slw_min_len} must be a multiple of 8 between 8 and seq_len={args.seq_len}")
    if args.ja_schedule == "piecewise":
        validate.parse_points(args.ja_points)
    if not args.sources:
        raise XltError("sources: the recipe lists no data source")


@dataclass
class EvalArguments:
    """Evaluation of a run directory: bits per character of base / cpt / sft, and a sample generation."""

    reads_output_dir: typing.ClassVar[bool] = True  # the run directory exists: checked, never created
    output_dir: str = field(default="runs/smollm2-135m-ja", metadata={"help": "The run directory to evaluate."})
    model: str = field(default=EMBEDDED_MODEL, metadata={"help": "The base model spec (the 'base' column)."})
    eval_max_docs: int = field(default=200, metadata={"help": "Held-out documents per language."})
    eval_max_length: int = field(default=1024, metadata={"help": "Window length (tokens) for bits per character."})
    generate_prompt: str = field(default="日本の首都はどこですか？", metadata={"help": "Instruction for the sample generation."})
    max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated for the sample."})
    prompt_format: str = field(default="stablelm_alpaca", metadata={"help": "Prompt format of the SFT model."})
    trust_remote_code: bool = field(default=False, metadata={"help": "See ModelArguments.trust_remote_code."})
    push_to_hub: bool = field(default=False, metadata={
        "help": "After evaluation, push the run (model, card, REPORT.md) to hub_repo_id; token checked first."})
    hub_repo_id: Optional[str] = field(default=None, metadata={"help": "Hub repo ORG/NAME for push_to_hub."})
    mc_data: Optional[str] = field(default=None, metadata={
        "help": "JCommonsenseQA-layout jsonl (question, choice0..choice4, label): multiple-choice accuracy of "
                "base / cpt / sft in report.json under 'mc'."})
    mc_max_n: Optional[int] = field(default=None, metadata={"help": "First N usable questions of mc_data only."})
    heldout_files: Optional[str] = field(default=None, metadata={
        "help": "Comma-separated text files (.jsonl with a 'text' field, or .txt) from OUTSIDE the training sources, "
                "e.g. ../shared/data/ja_wiki_paragraphs.jsonl: bits per character of every stage on each (first "
                "eval_max_docs documents), in report.json bpc under the file's stem, listed in eval.heldout_files."})
    speed_max_chars: int = field(default=80, metadata={
        "help": "Generation speed of every stage (Japanese characters per second and per token, greedy, the same "
                "8 Japanese prompts, this many characters of output each) in report.json under 'speed'; 0 skips it."})
    mt_bench: bool = field(default=False, metadata={
        "help": "Japanese MT-Bench of the SFT model (answers in its training format, graded by mt_bench_judge) in "
                "report.json under 'mt_bench'; files in OUTPUT_DIR/mt_bench/."})
    mt_bench_judge: Optional[str] = field(default=None, metadata={
        "help": "MT-Bench judge: a model spec (local, greedy) or an OpenAI-compatible URL (http://HOST:PORT/v1; key "
                "from OPENAI_API_KEY) serving mt_bench_judge_model."})
    mt_bench_judge_model: Optional[str] = field(default=None, metadata={
        "help": "The model name the mt_bench_judge URL serves (e.g. gpt-4)."})
    mt_bench_questions: str = field(default="../shared/data/japanese_mt_bench/question.jsonl", metadata={
        "help": "FastChat question.jsonl; judge_prompts.jsonl and the gpt-4 reference answers are read next to it."})
    mt_bench_max_questions: Optional[int] = field(default=None, metadata={"help": "First N MT-Bench questions only."})
    mt_bench_max_new_tokens: int = field(default=1024, metadata={"help": "Longest MT-Bench answer per turn."})
    mt_bench_judge_max_tokens: int = field(default=2048, metadata={"help": "Longest verdict (FastChat: 2048)."})


@dataclass
class OutputArguments:
    """Where a stage that is not a Trainer run (the tokenizer stage) writes."""

    output_dir: str = field(default="runs/smollm2-135m-ja", metadata={"help": "The run directory."})


def cpt_recipe_types() -> list[type]:
    """The dataclasses a cpt recipe is parsed into, in order (``xlt cpt``, ``xlt check``, ``xlt data preview`` and
    the arms of ``xlt compare``): model, tokenizer, data, cpt, LoRA keys, then transformers' TrainingArguments."""
    from transformers import TrainingArguments

    return [ModelArguments, TokenizerArguments, DataArguments, CptArguments, LoraSettings, TrainingArguments]



@dataclass
class CptRecipe:
    """A parsed cpt recipe, each part by name: ``CptRecipe.parse(argv)`` (``--config FILE`` plus command-line
    overrides), as ``xlt cpt``, ``xlt check``, ``xlt data`` and the arms of ``xlt compare`` read it."""

    model: ModelArguments
    tokenizer: TokenizerArguments
    data: DataArguments
    cpt: CptArguments
    lora: LoraSettings
    training: Any  # transformers.TrainingArguments

    @classmethod
    def parse(cls, argv: Sequence[str], device_free: bool = False, precision: Optional[str] = None) -> CptRecipe:
        return cls(*parse_recipe(cpt_recipe_types(), argv, device_free=device_free, precision=precision))


@dataclass
class SftRecipe:
    """A parsed sft recipe: ``SftRecipe.parse(argv)``, as ``xlt sft`` and ``xlt check`` read it."""

    sft: SftArguments
    training: Any  # trl.SFTConfig

    @classmethod
    def parse(cls, argv: Sequence[str], device_free: bool = False, precision: Optional[str] = None) -> SftRecipe:
        from trl import SFTConfig  # here, not at the top: importing the config loads no training library

        return cls(*parse_recipe([SftArguments, SFTConfig], argv, device_free=device_free, precision=precision))
