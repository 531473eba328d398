"""``xlt plan``: how big a run a compute budget buys, and what a Japanese corpus is worth in it.

Compute budget ``C = gpus * peak * 86400 * days * mfu`` (dense bf16 peak of the GPU), training cost
``C = 6 N D`` (N parameters, D tokens). The loss fit ``L(N, D) = E + A / N**alpha + B / D**beta`` is
minimised under that constraint in closed form (Hoffmann et al. 2022, appendix D.2):

    N_opt = G * (C / 6) ** (beta / (alpha + beta)),   G = (alpha A / (beta B)) ** (1 / (alpha + beta)),
    D_opt = (C / 6) / N_opt

for two fits: Hoffmann et al. approach 3 and the Epoch AI re-fit of the same data (Besiroglu et al.
2024), whose tokens-per-parameter ratio differs noticeably. Repeated data follows Muennighoff et al.
2023 ("Scaling Data-Constrained Language Models"): U unique tokens seen for ``epochs`` passes are worth

    D' = U + U * R_D* * (1 - exp(-R / R_D*)),   R = epochs - 1,   R_D* = 15.39

tokens of fresh data. No library computes these (they are a few formulas), hence this module.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from xlt.config import XltError

#: Dense (no sparsity) bf16 tensor-core peak, FLOP/s, from the vendors' data sheets.
GPU_PEAK_FLOPS = {"h100": 989e12, "h100-sxm": 989e12, "h200": 989e12, "a100": 312e12}

SECONDS_PER_DAY = 86400
R_D_STAR = 15.39  # Muennighoff et al. 2023, fitted decay constant of repeated data


@dataclass(frozen=True)
class LossFit:
    """``L(N, D) = E + A / N**alpha + B / D**beta``."""

    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, params: float, tokens: float) -> float:
        return self.E + self.A / params**self.alpha + self.B / tokens**self.beta

    def optimum(self, flops: float) -> tuple[float, float]:
        """Closed-form ``(N_opt, D_opt)`` minimising ``loss`` subject to ``6 N D = flops``."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        n = g * (flops / 6.0) ** (b / (a + b))
        return n, (flops / 6.0) / n


HOFFMANN = LossFit("hoffmann", E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
EPOCH_AI = LossFit("epoch_ai", E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_number(text: Any, flag: str) -> float:
    """``"135M"``, ``"1.7B"``, ``"2e12"``, ``"0.4"`` -> float; anything else is an ``XltError`` naming ``flag``."""
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    m = re.fullmatch(r"([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)([kmbgt]?)", s)
    if not m:
        raise XltError(f"{flag}: not a number: {text!r} (e.g. 8, 0.4, 1.7B, 2e12)")
    value = float(m.group(1)) * _SUFFIX.get(m.group(2), 1.0)
    if not math.isfinite(value):
        raise XltError(f"{flag}: not a finite number: {text!r}")
    return value


def gpu_peak(name: str) -> float:
    """Dense bf16 peak FLOP/s of ``name`` (case-insensitive); unknown names list the known ones."""
    key = str(name).strip().lower()
    if key not in GPU_PEAK_FLOPS:
        raise XltError(f"--gpu: unknown GPU {name!r}; known: {', '.join(GPU_PEAK_FLOPS)}")
    return GPU_PEAK_FLOPS[key]


def compute_budget(gpus: float, gpu: str, days: float, mfu: float) -> float:
    """``gpus * peak(gpu) * 86400 * days * mfu`` FLOPs; raises ``XltError`` on a non-positive input or mfu > 1."""
    if gpus <= 0 or gpus != int(gpus):
        raise XltError(f"--gpus: must be a positive whole number, got {gpus:g}")
    if days <= 0:
        raise XltError(f"--days: must be positive, got {days:g}")
    if not 0 < mfu <= 1:
        raise XltError(f"--mfu: must be in (0, 1] (a fraction, e.g. 0.4), got {mfu:g}")
    return gpus * gpu_peak(gpu) * SECONDS_PER_DAY * days * mfu


def effective_data_ratio(epochs: float, r_d_star: float = R_D_STAR) -> float:
    """Value of ``epochs`` passes over U unique tokens, as a fraction of ``U * epochs`` fresh tokens.

    1.0 for at most one epoch; ``(1 + R_D* (1 - exp(-(epochs - 1) / R_D*))) / epochs`` beyond (Muennighoff et al.).
    """
    if epochs <= 1:
        return 1.0
    repeats = epochs - 1
    return (1.0 + r_d_star * (1.0 - math.exp(-repeats / r_d_star))) / epochs


def plan(gpus: float, gpu: str, days: float, mfu: float, params: Optional[float] = None,
         ja_chars: Optional[float] = None, chars_per_token: float = 1.0, ja_share: float = 1.0) -> dict:
    """The planner's result (the ``--json`` object).

    Guarantees: ``compute_flops`` = 6 * params * tokens for every ``{params, tokens}`` pair;
    ``ja_epochs`` and ``effective_data_ratio`` refer to ``fixed_model`` when ``params`` is given,
    else to the Hoffmann optimum (``japanese.basis`` says which).
    """
    flops = compute_budget(gpus, gpu, days, mfu)
    if params is not None and params <= 0:
        raise XltError(f"--params: must be positive, got {params:g}")
    if chars_per_token <= 0:
        raise XltError(f"--chars-per-token: must be positive, got {chars_per_token:g}")
    if not 0 < ja_share <= 1:
        raise XltError(f"--ja-share: must be in (0, 1], got {ja_share:g}")
    if ja_chars is not None and ja_chars <= 0:
        raise XltError(f"--ja-chars: must be positive, got {ja_chars:g}")
    out: dict[str, Any] = {
        "compute_flops": flops,
        "inputs": {"gpus": int(gpus), "gpu": gpu.lower(), "peak_flops_per_gpu": gpu_peak(gpu), "days": days,
                   "mfu": mfu},
    }
    for fit in (HOFFMANN, EPOCH_AI):
        n, d = fit.optimum(flops)
        out[fit.name] = {"params": n, "tokens": d, "tokens_per_param": d / n, "loss": fit.loss(n, d)}
    if params is not None:
        out["fixed_model"] = {"params": params, "tokens": flops / (6.0 * params),
                              "tokens_per_param": flops / (6.0 * params * params)}
    if ja_chars is not None:
        basis = "fixed_model" if params is not None else "hoffmann"
        seen = out[basis]["tokens"] * ja_share
        corpus_tokens = ja_chars / chars_per_token
        epochs = seen / corpus_tokens
        ratio = effective_data_ratio(epochs)
        out["ja_epochs"] = epochs
        out["effective_data_ratio"] = ratio
        out["japanese"] = {
            "basis": basis, "chars": ja_chars, "chars_per_token": chars_per_token, "share": ja_share,
            "corpus_tokens": corpus_tokens, "tokens_seen": seen, "epochs": epochs,
            "effective_tokens": seen * ratio,
            "assumption": f"{ja_share:.0%} of the {basis} tokens are Japanese, drawn from a corpus of "
                          f"{ja_chars:.3g} characters at {chars_per_token:g} characters per token; "
                          f"repeats valued by Muennighoff et al. 2023 (R_D* = {R_D_STAR})",
        }
    return out


def _fmt(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def format_plan(p: dict) -> str:
    """A short human-readable summary of ``plan``'s result."""
    i = p["inputs"]
    lines = [f"compute: {i['gpus']} x {i['gpu']} x {i['days']:g} days x {i['mfu']:.0%} MFU = "
             f"{p['compute_flops']:.3g} FLOPs (C = 6 N D)"]
    for key, label in (("hoffmann", "Hoffmann et al. 2022"), ("epoch_ai", "Epoch AI re-fit 2024")):
        r = p[key]
        lines.append(f"{label:<22} optimum: {_fmt(r['params'])} params, {_fmt(r['tokens'])} tokens "
                     f"({r['tokens_per_param']:.1f} tokens/param)")
    if "fixed_model" in p:
        f = p["fixed_model"]
        lines.append(f"fixed model {_fmt(f['params'])} params: {_fmt(f['tokens'])} tokens "
                     f"({f['tokens_per_param']:.1f} tokens/param)")
    if "japanese" in p:
        j = p["japanese"]
        lines.append(f"Japanese: {_fmt(j['tokens_seen'])} tokens seen of a {_fmt(j['corpus_tokens'])}-token corpus "
                     f"= {j['epochs']:.2f} epochs, worth {p['effective_data_ratio']:.1%} of fresh data "
                     f"({_fmt(j['effective_tokens'])} effective tokens)")
        lines.append(f"assumption: {j['assumption']}")
    return "\n".join(lines)
