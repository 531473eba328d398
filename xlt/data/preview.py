"""``xlt data preview``: the curriculum continued pretraining will realise (no model).

Per optimizer step: tokens so far, the Japanese share the schedule asks for over the step's
tokens and the share the run's data places, the same two cumulatively, and the warmup
sequence length. On the token shards (``data_source: shards``) the share placed is their layout's
(``xlt.data.shards.ja_tokens_before``, which every step's rows hold exactly), so nothing needs preparing;
on the in-memory stream the rows come from ``build_pretrain_stream``, run for real.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterator
from typing import Any, Optional

from xlt.config import XltError
from xlt.data.schedule import cumulative_ja_target, ja_ratio, seq_len_at

KEYS = ("step", "tokens", "target_ja", "realised_ja", "cum_target_ja", "cum_realised_ja", "seq_len")
TEXT_ROWS = 40  # text output shows this many evenly spaced steps (--json shows all)


def _shard_steps(data_args: Any, total_tokens: int, rows_per_step: int) -> Iterator[tuple[int, int]]:
    """(Japanese tokens, warmup length) of each step of the token shards' layout."""
    from xlt.data.shards import ja_tokens_before

    step_tokens = rows_per_step * int(data_args.seq_len)
    before = 0
    for step in itertools.count():
        upto = ja_tokens_before(step + 1, step_tokens, total_tokens, data_args)
        yield upto - before, seq_len_at(step * step_tokens, total_tokens, data_args)
        before = upto


def _stream_steps(data_args: Any, tokenizer: Any, total_tokens: int, rows_per_step: int) -> Iterator[tuple[int, int]]:
    """(Japanese tokens, warmup length of its first row) of each step of the in-memory stream, run for real."""
    from xlt.data.stream import build_pretrain_stream

    rows = build_pretrain_stream(data_args, tokenizer, total_tokens, rows_per_step).global_rows()
    while True:
        step = [next(rows) for _ in range(rows_per_step)]
        yield sum(r.lang_tokens["ja"] for r in step), step[0].warm_len


def preview(data_args: Any, tokenizer: Any, total_tokens: int, rows_per_step: int, steps: int) -> list[dict]:
    """One dict per step (keys ``KEYS``) for the first ``steps`` steps of the run's data (``data_source``)."""
    if data_args.data_source == "shards":
        per_step = _shard_steps(data_args, total_tokens, rows_per_step)
    else:
        per_step = _stream_steps(data_args, tokenizer, total_tokens, rows_per_step)
    step_tokens = rows_per_step * int(data_args.seq_len)
    out: list[dict] = []
    ja_cum = 0
    for step, (ja_step, seq_len) in zip(range(1, steps + 1), per_step):
        ja_cum += ja_step
        t0, t1 = (step - 1) * step_tokens, step * step_tokens
        c0, c1 = cumulative_ja_target(t0, total_tokens, data_args), cumulative_ja_target(t1, total_tokens, data_args)
        out.append({"step": step, "tokens": t1, "target_ja": (c1 - c0) / step_tokens,
                    "realised_ja": ja_step / step_tokens, "cum_target_ja": c1 / t1, "cum_realised_ja": ja_cum / t1,
                    "seq_len": seq_len})
    return out


def plot_preview(rows: list[dict], png_path: str, data_args: Optional[Any] = None,
                 total_tokens: Optional[int] = None) -> None:
    """Japanese share (schedule, per step, cumulative) and the warmup length against tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if data_args is not None and total_tokens:
        xs = [tokens[-1] * i / 400 for i in range(401)]
        ax.plot(xs, [ja_ratio(x, total_tokens, data_args) for x in xs], color="0.6", lw=1, label="schedule r(t)")
    ax.step(tokens, [r["realised_ja"] for r in rows], where="pre", color="tab:red", lw=1, label="realised, per step")
    ax.plot(tokens, [r["cum_target_ja"] for r in rows], color="tab:blue", ls="--", lw=1.5, label="cumulative target")
    ax.plot(tokens, [r["cum_realised_ja"] for r in rows], color="tab:green", ls=":", lw=2, label="cumulative realised")
    ax.set_xlabel("tokens trained")
    ax.set_ylabel("Japanese share of tokens")
    ax.set_ylim(-0.02, 1.02)
    ax2 = ax.twinx()
    ax2.plot(tokens, [r["seq_len"] for r in rows], color="tab:purple", lw=1, alpha=0.7, label="sequence length")
    ax2.set_ylabel("sequence length (tokens)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right", fontsize=8)
    ax.set_title("xlt data preview: Japanese-ratio curriculum and sequence-length warmup")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def run_preview(ns: argparse.Namespace) -> int:
    try:
        return _preview_command(ns)
    except XltError as e:
        print(f"xlt: error: {e}", file=sys.stderr)
        return 2


def _preview_command(ns: argparse.Namespace) -> int:
    from xlt.config import CptRecipe
    from xlt.data.steps import plan_steps
    from xlt.models import load_tokenizer

    r = CptRecipe.parse(["--config", ns.config], device_free=True)  # the stream and tokenizer only: no device check
    model_args, tok_args, data_args, cpt_args, training_args = r.model, r.tokenizer, r.data, r.cpt, r.training
    plan = plan_steps(data_args, cpt_args, training_args, world_size=1)
    steps = plan.max_steps if ns.steps is None else ns.steps
    if steps <= 0:
        raise XltError(f"--steps must be positive (got {steps})")
    tokenizer = None  # the shards' layout needs no tokens
    if data_args.data_source != "shards":
        tokenizer = load_tokenizer(model_args.model, trust_remote_code=model_args.trust_remote_code)
    rows = preview(data_args, tokenizer, plan.total_tokens, plan.rows_per_step, steps)
    if ns.plot:
        plot_preview(rows, ns.plot, data_args, plan.total_tokens)
    if ns.json:
        print(json.dumps(rows))
        return 0
    note = ""
    if tok_args.tokenizer_mode != "none" and tokenizer is not None:  # the stream tokenizes; the layout does not
        note = f" (base tokenizer of {model_args.model}; the '{tok_args.tokenizer_mode}' tokenizer is not applied here)"
    print(f"{plan.describe()}{note}")
    print("data: token shards (data_source: shards): each step holds the layout's Japanese tokens exactly"
          if data_args.data_source == "shards" else "data: the in-memory stream (data_source: stream), run here")
    print(f"{'step':>7} {'tokens':>12} {'target_ja':>9} {'real_ja':>8} {'cum_tgt':>8} {'cum_real':>8} {'seq_len':>7}")
    shown = rows if len(rows) <= TEXT_ROWS else [rows[round(i * (len(rows) - 1) / (TEXT_ROWS - 1))] for i in range(TEXT_ROWS)]
    for r in shown:
        print(f"{r['step']:>7} {r['tokens']:>12,} {r['target_ja']:>9.4f} {r['realised_ja']:>8.4f} "
              f"{r['cum_target_ja']:>8.4f} {r['cum_realised_ja']:>8.4f} {r['seq_len']:>7}")
    if len(rows) > TEXT_ROWS:
        print(f"({TEXT_ROWS} of {len(rows)} steps shown; --json prints every step)")
    if ns.plot:
        print(f"plot: {ns.plot}")
    return 0
