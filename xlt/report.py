"""The run report: what a person reads at the end (a table) next to report.json (every figure)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional

from xlt.config import XltError
from xlt.io import atomic_write_text


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of the headline figures of ``report.json``."""
    lines = []
    tok = report.get("tokenizer")
    if tok and tok.get("mode") == "none":
        lines.append(f"{'tokenizer':<24}the base model's own (tokenizer_mode none; whether extending it pays at this "
                     f"compute: make compare)")
        lines.append("")
    elif tok:
        lines.append(f"{'tokenizer':<24}{'base':>10}{'extended':>10}")
        for lang in ("ja", "en"):
            cpt = tok.get(f"{lang}_chars_per_token", {})
            lines.append(f"{lang + ' chars/token':<24}{cpt.get('base', float('nan')):>10.3f}"
                         f"{cpt.get('extended', float('nan')):>10.3f}")
        lines.append(f"{'new tokens':<24}{tok.get('new_tokens', 0):>10}")
        lines.append("")
    bpc = report.get("bpc", {})
    if bpc:
        stages = [s for s in ("base", "cpt", "sft") if any(s in v for v in bpc.values())]
        lines.append(f"{'bits per character':<24}" + "".join(f"{s:>10}" for s in stages))
        for lang, row in bpc.items():
            lines.append(f"{lang:<24}" + "".join(f"{row[s]:>10.4f}" if s in row else f"{'-':>10}" for s in stages))
        lines.append("")
    mc = {s: v for s, v in report.get("mc", {}).items() if s in ("base", "cpt", "sft") and isinstance(v, dict)}
    if mc:
        stages = [s for s in ("base", "cpt", "sft") if s in mc]
        n = max(v.get("n", 0) for v in mc.values())
        lines.append(f"{'multiple choice':<24}" + "".join(f"{s:>10}" for s in stages))
        nan = float("nan")
        lines.append(f"{'accuracy':<24}" + "".join(f"{mc[s].get('accuracy', nan):>10.4f}" for s in stages))
        lines.append(f"{'accuracy (per char)':<24}" + "".join(f"{mc[s].get('accuracy_norm', nan):>10.4f}"
                                                              for s in stages))
        ci = {s: mc[s].get("ci95") or (nan, nan) for s in stages}
        lines.append(f"{'95% CI':<24}" + "".join(f"{ci[s][0]:>5.2f}-{ci[s][1]:<4.2f}" for s in stages))
        lines.append(f"{'questions':<24}{n:>10}")
        lines.append("")
    lines.extend(_mt_bench_text(report.get("mt_bench")))
    trained = report.get("tokens_trained")
    if trained:
        total = sum(trained.values()) or 1
        lines.append("tokens trained: " + ", ".join(f"{k} {v:,} ({v / total:.1%})" for k, v in trained.items()))
    if "wall_seconds" in report:
        lines.append(f"wall time: {report['wall_seconds']:.0f} s")
    return "\n".join(lines)


def _score(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


def _mt_bench_text(mb: Optional[dict]) -> list[str]:
    """MT-Bench lines of the plain-text table (score 1-10, means over rated judgments)."""
    if not isinstance(mb, dict) or "n" not in mb:
        return []
    return [f"{'MT-Bench (sft)':<24}{'score':>10}{'turn 1':>10}{'turn 2':>10}",
            f"{'judge ' + str(mb.get('judge', '?')):<24}{_score(mb.get('score')):>10}{_score(mb.get('turn1')):>10}"
            f"{_score(mb.get('turn2')):>10}",
            f"{'judgments':<24}{mb['n']:>10} ({mb.get('unparsed', 0)} without a rating)", ""]


def mt_bench_markdown(mb: dict) -> list[str]:
    """The MT-Bench table of REPORT.md and the model card: overall, per turn, per category, and the judge."""
    rows = [["overall", _score(mb.get("score"))], ["turn 1", _score(mb.get("turn1"))],
            ["turn 2", _score(mb.get("turn2"))]]
    rows += [[c, _score(v)] for c, v in (mb.get("categories") or {}).items()]
    return _md_table(["Japanese MT-Bench (1-10)", "score"], rows) + [
        "", f"Judge `{mb.get('judge', '?')}`, {mb.get('n', 0)} judgments, {mb.get('unparsed', 0)} without a rating "
            "(not averaged).", ""]


def _plot_mt_bench(categories: dict[str, float], path: str) -> None:
    """Radar plot of the per-category scores (1-10), as FastChat's MT-Bench plots."""
    import math

    names = list(categories)
    angles = [2 * math.pi * i / len(names) for i in range(len(names))]
    values = [categories[n] for n in names]
    fig = new_figure(5, 5)
    ax = fig.add_subplot(projection="polar")
    ax.plot(angles + angles[:1], values + values[:1], marker="o")
    ax.fill(angles + angles[:1], values + values[:1], alpha=0.2)
    ax.set_xticks(angles)
    ax.set_xticklabels(names)
    ax.set_ylim(0, 10)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# REPORT.md with plots (``xlt report RUN_DIR``)
# ---------------------------------------------------------------------------------------------
REPORT_MD = "REPORT.md"
PLOTS_DIR = "plots"
STAGES = ("base", "cpt", "sft")
SFT_COUNT_COLUMNS = ("rows", "train_rows", "eval_rows", "duplicates", "capped", "failed_translation", "empty",
                     "malformed", "truncated", "fully_masked")


def _sft_section(sft: dict) -> list[str]:
    """``## Instruction SFT``: eval loss per epoch, the per-dataset counts and the sample generations, when the
    run has them (an SFT section is optional: a continued-pretraining run has none, and says nothing)."""
    if not (sft.get("eval_loss") or sft.get("counts") or sft.get("generations")):
        return []
    out = ["## Instruction SFT", ""]
    if sft.get("eval_loss"):
        out.extend(_md_table(["epoch", "eval loss"], [[e["epoch"], e["eval_loss"]] for e in sft["eval_loss"]]) + [""])
    counts = sft.get("counts") or {}
    if counts:
        out.extend(_md_table(["dataset", *SFT_COUNT_COLUMNS],
                             [[name, *(c.get(k, "-") for k in SFT_COUNT_COLUMNS)] for name, c in counts.items()])
                   + [""])
    for g in sft.get("generations") or []:
        out.append(f"- {g['instruction']} → {g['output']}")
    return out + [""]


SECTIONS = (
    "Summary",
    "Training loss over tokens",
    "Japanese share: realised vs target",
    "Sequence length",
    "Tokens per language and per source",
    "Tokenizer compression",
    "Bits per character by stage",
    "Multiple-choice accuracy",
    "Generation speed",
)


def _mt_bench_section(mb: Optional[dict], plots: str) -> list[str]:
    """``## Japanese MT-Bench`` (only when the evaluate stage ran it): radar plot per category and the table."""
    if not isinstance(mb, dict) or "n" not in mb:
        return []
    out = ["## Japanese MT-Bench", ""]
    cats = {c: v for c, v in (mb.get("categories") or {}).items() if isinstance(v, (int, float))}
    if len(cats) >= 3:
        _plot_mt_bench(cats, os.path.join(plots, "mt_bench.png"))
        out.extend([f"![MT-Bench score per category]({PLOTS_DIR}/mt_bench.png)", ""])
    return out + mt_bench_markdown(mb)


def _read_json(path: str) -> Optional[Any]:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise XltError(f"{path}: not valid JSON ({e})") from None


def _tensorboard_history(run_dir: str) -> list[dict[str, Any]]:
    """Training scalars from TensorBoard event files under ``run_dir/runs`` (``report_to: tensorboard``), one
    record per step, in the keys of the Trainer's log history; [] when there are none."""
    logdir = os.path.join(run_dir, "runs")
    if not os.path.isdir(logdir):
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_step: dict[int, dict[str, Any]] = {}
    for root, _, files in os.walk(logdir):
        if not any(f.startswith("events.out.tfevents") for f in files):
            continue
        acc = EventAccumulator(root, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            key = tag.split("/", 1)[1] if tag.startswith("train/") else None
            if key is None:
                continue
            for ev in acc.Scalars(tag):
                by_step.setdefault(ev.step, {"step": ev.step})[key] = ev.value
    return [by_step[s] for s in sorted(by_step)]


def training_history(run_dir: str) -> tuple[list[dict[str, Any]], str]:
    """The continued-pretraining log records (those with a ``loss``) and where they came from.

    Source order: the newest complete checkpoint's ``trainer_state.json`` (the Trainer's log history, which
    holds xlt's ``tokens_trained*``, ``ja_share_*`` and ``seq_len`` keys), else TensorBoard events."""
    from xlt.train.checkpoint import last_complete_checkpoint

    ckpt = last_complete_checkpoint(run_dir)
    if ckpt is not None:
        state = _read_json(os.path.join(ckpt, "trainer_state.json")) or {}
        rows = [r for r in state.get("log_history", []) if "loss" in r]
        if rows:
            return rows, os.path.relpath(os.path.join(ckpt, "trainer_state.json"), run_dir)
    rows = [r for r in _tensorboard_history(run_dir) if "loss" in r]
    return rows, ("TensorBoard events in runs/" if rows else "")


def save_figure(fig: Any, path: str) -> None:
    """Save a figure as PNG atomically (temporary file in the same folder, then rename)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is for reading
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def new_figure(width: float = 6.4, height: float = 3.6) -> Any:
    # A bare Figure renders with the Agg canvas without touching pyplot's global backend state.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _x_tokens(rows: list[dict[str, Any]]) -> tuple[list[float], str]:
    if all("tokens_trained" in r for r in rows):
        return [r["tokens_trained"] for r in rows], "tokens trained"
    return [r.get("step", i) for i, r in enumerate(rows)], "step"


def _plot_loss(rows: list[dict[str, Any]], path: str) -> None:
    x, xlabel = _x_tokens(rows)
    fig = new_figure()
    ax = fig.add_subplot()
    langs = sorted({k[len("loss_"):] for r in rows for k in r if k.startswith("loss_")})
    if langs:
        for lang in langs:
            pts = [(xi, r[f"loss_{lang}"]) for xi, r in zip(x, rows) if f"loss_{lang}" in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"{lang} loss")
    ax.plot(x, [r["loss"] for r in rows], marker=".", color="black", label="total loss")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def ja_share_windows(rows: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per logging window (previous log point to this one): the realised Japanese share of the tokens trained in
    the window, and the schedule's share over the same window when the log holds the cumulative target."""
    out, prev = [], {"tokens_trained": 0, "tokens_trained_ja": 0, "ja_share_cum_target": 0.0}
    for r in rows:
        if "tokens_trained" not in r or "tokens_trained_ja" not in r:
            continue
        n = r["tokens_trained"] - prev["tokens_trained"]
        if n > 0:
            w = {"start": prev["tokens_trained"], "end": r["tokens_trained"],
                 "realised": (r["tokens_trained_ja"] - prev["tokens_trained_ja"]) / n}
            if "ja_share_cum_target" in r and "ja_share_cum_target" in prev:
                w["target"] = (r["ja_share_cum_target"] * r["tokens_trained"]
                               - prev["ja_share_cum_target"] * prev["tokens_trained"]) / n
            out.append(w)
        prev = r
    return out


def _plot_ja_share(rows: list[dict[str, Any]], path: str) -> None:
    """Like against like: the share realised in each logging window against the schedule, and the cumulative
    realised share against the cumulative target (the schedule's integral), never cumulative against instant."""
    x, xlabel = _x_tokens(rows)
    fig = new_figure(height=6.4)
    top, bottom = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    windows = ja_share_windows(rows)
    for i, w in enumerate(windows):
        top.plot([w["start"], w["end"]], [w["realised"]] * 2, color="C0", label="realised (per window)" if i == 0 else None)
    pts = [(xi, r["ja_share_target"]) for xi, r in zip(x, rows) if "ja_share_target" in r]
    top.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", color="C1", label="schedule")
    for key, label in (("ja_share_cum", "realised (cumulative)"), ("ja_share_cum_target", "target (cumulative)")):
        pts = [(xi, r[key]) for xi, r in zip(x, rows) if key in r]
        bottom.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=label)
    for ax in (top, bottom):
        ax.set_ylabel("Japanese share of tokens")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    bottom.set_xlabel(xlabel)
    save_figure(fig, path)


def _ja_share_text(rows: list[dict[str, Any]], acc: dict[str, Any]) -> str:
    last = [r for r in rows if "ja_share_cum" in r][-1]
    text = f"At the last log point: realised {last['ja_share_cum']:.3f} cumulative"
    if "ja_share_cum_target" in last:
        text += f", cumulative target {last['ja_share_cum_target']:.3f}"
    windows = ja_share_windows(rows)
    if windows:
        text += f"; last window realised {windows[-1]['realised']:.3f}"
        if "target" in windows[-1]:
            text += f", schedule over that window {windows[-1]['target']:.3f}"
    if "ja_share_target" in last:
        text += f", schedule at that point {last['ja_share_target']:.3f}"
    if "ja_share_trained" in acc:
        text += f"; over the whole run {acc['ja_share_trained']:.3f}"
    return text + "."


def _plot_seq_len(rows: list[dict[str, Any]], path: str) -> None:
    x, xlabel = _x_tokens(rows)
    pts = [(xi, r["seq_len"]) for xi, r in zip(x, rows) if "seq_len" in r]
    fig = new_figure()
    ax = fig.add_subplot()
    ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", marker=".")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("sequence length (tokens)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _bars(ax: Any, groups: list[str], series: dict[str, list[float]], fmt: str = "{:.3g}") -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per series, each bar labelled with its value."""
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, labels=[fmt.format(v) if v == v else "" for v in values], fontsize=8)
    ax.set_xticks(range(len(groups)), groups)
    if len(series) > 1:
        ax.legend()


def _plot_tokens(acc: dict[str, Any], trained: dict[str, int], path: str) -> None:
    by_source = acc.get("tokens_by_source", {})
    fig = new_figure(9.0, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    langs = list(trained)
    _bars(ax1, langs, {"trained": [trained[k] for k in langs],
                       **({"target": [acc["target_tokens"].get(k, float("nan")) for k in langs]}
                          if acc.get("target_tokens") else {})}, "{:,.0f}")
    ax1.set_title("tokens per language")
    srcs = list(by_source)
    _bars(ax2, srcs, {"trained": [by_source[s] for s in srcs]}, "{:,.0f}")
    ax2.set_title("tokens per source")
    ax2.tick_params(axis="x", labelrotation=20)
    save_figure(fig, path)


def _plot_tokenizer(tok: dict[str, Any], path: str) -> None:
    langs = [lang for lang in ("ja", "en") if f"{lang}_chars_per_token" in tok]
    fig = new_figure()
    ax = fig.add_subplot()
    _bars(ax, langs, {kind: [tok[f"{lang}_chars_per_token"].get(kind, float("nan")) for lang in langs]
                      for kind in ("base", "extended")}, "{:.3f}")
    ax.set_ylabel("characters per token (higher = cheaper)")
    save_figure(fig, path)


def _plot_bpc(bpc: dict[str, dict[str, float]], path: str) -> None:
    langs = list(bpc)
    stages = [s for s in STAGES if any(s in row for row in bpc.values())]
    fig = new_figure()
    ax = fig.add_subplot()
    _bars(ax, langs, {s: [bpc[lang].get(s, float("nan")) for lang in langs] for s in stages}, "{:.3f}")
    ax.set_ylabel("bits per character (lower = better)")
    save_figure(fig, path)


def _plot_mc(mc: dict[str, dict[str, Any]], path: str) -> None:
    stages = [s for s in STAGES if s in mc] + [s for s in mc if s not in STAGES]
    fig = new_figure()
    ax = fig.add_subplot()
    series = {"accuracy": [mc[s].get("accuracy", float("nan")) for s in stages]}
    if any("accuracy_norm" in mc[s] for s in stages):
        series["accuracy (per-char normalised)"] = [mc[s].get("accuracy_norm", float("nan")) for s in stages]
    _bars(ax, stages, series, "{:.3f}")
    ci = [mc[s].get("ci95") for s in stages]
    if all(isinstance(c, (list, tuple)) and len(c) == 2 for c in ci):
        n = len(series)
        x0 = [i - (n - 1) / 2 * 0.8 / n for i in range(len(stages))]
        acc = series["accuracy"]
        ax.errorbar(x0, acc, yerr=[[a - c[0] for a, c in zip(acc, ci)], [c[1] - a for a, c in zip(acc, ci)]],
                    fmt="none", ecolor="black", capsize=3)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    save_figure(fig, path)


def _speed_rows(speed: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The per-model numeric figures of ``report["speed"]`` ({name: {metric: value}}), whatever its nesting."""
    rows: dict[str, dict[str, float]] = {}
    for name, v in speed.items():
        if isinstance(v, dict):
            nums = {k: x for k, x in v.items() if isinstance(x, (int, float)) and not isinstance(x, bool)}
            if nums:
                rows[str(name)] = nums
        elif isinstance(v, list):
            for i, item in enumerate(v):
                if isinstance(item, dict):
                    label = str(item.get("model", item.get("name", f"{name}[{i}]")))
                    nums = {k: x for k, x in item.items() if isinstance(x, (int, float)) and not isinstance(x, bool)}
                    if nums:
                        rows[label] = nums
    return rows


def _plot_speed(rows: dict[str, dict[str, float]], path: str) -> None:
    metrics = [m for m in ("chars_per_second", "chars_per_token") if any(m in r for r in rows.values())]
    if not metrics:
        metrics = sorted({m for r in rows.values() for m in r})[:2]
    names = [os.path.basename(n.rstrip("/")) or n for n in rows]
    fig = new_figure(4.2 * len(metrics), 3.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, m in zip(axes, metrics):
        _bars(ax, names, {m: [r.get(m, float("nan")) for r in rows.values()]}, "{:.3g}")
        ax.set_title(m.replace("_", " "))
    save_figure(fig, path)


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) >= 1e4 else f"{v:.4g}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]


class _Page:
    """REPORT.md while it is written: its lines, and the plots folder its images go to."""

    def __init__(self, plots: str) -> None:
        self.plots = plots
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def plot(self, draw: Any, name: str, alt: str, *data: Any) -> None:
        """``draw(*data, path)`` into plots/``name``, and the image's line."""
        draw(*data, os.path.join(self.plots, name))
        self.add(f"![{alt}]({PLOTS_DIR}/{name})", "")

    def missing(self, what: str) -> None:
        self.add(f"_Not measured: {what}._", "")


def _summary(page: _Page, report: dict, rows: list[dict], source: Optional[str]) -> None:
    cpt, sft = report.get("cpt", {}), report.get("sft")
    page.add(f"Base model `{cpt.get('model', 'n/a')}`; continued pretraining {cpt.get('steps', 'n/a')} steps x "
             f"{cpt.get('tokens_per_step', 'n/a')} tokens, final train loss {cpt.get('train_loss', 'n/a')}"
             + (f"; SFT {sft.get('steps', 'n/a')} steps, final loss {sft.get('train_loss')}" if sft else "") + ".",
             "", "```", format_table(report), "```", "")


def _loss(page: _Page, report: dict, rows: list[dict], source: Optional[str]) -> None:
    if not rows:
        page.missing("no training log (no complete checkpoint with trainer_state.json, no TensorBoard events)")
        return
    page.plot(_plot_loss, "loss.png", "training loss over tokens", rows)
    if not any(k.startswith("loss_") for r in rows for k in r):
        page.add("The training log holds the total loss only (not split by language); the per-language quality is "
                 "the held-out bits per character below.", "")
    page.add(f"Source: `{source}`, {len(rows)} log points.", "")


def _ja_share(page: _Page, report: dict, rows: list[dict], source: Optional[str]) -> None:
    if not any("ja_share_cum" in r for r in rows):
        page.missing("the training log has no ja_share_cum")
        return
    page.plot(_plot_ja_share, "ja_share.png", "Japanese share realised vs target", rows)
    page.add(_ja_share_text(rows, report.get("cpt", {}).get("accounting", {})), "")


def _seq_len(page: _Page, report: dict, rows: list[dict], source: Optional[str]) -> None:
    if not any("seq_len" in r for r in rows):
        page.missing("the training log has no seq_len")
        return
    page.plot(_plot_seq_len, "seq_len.png", "sequence length over tokens", rows)


def _tokens(page: _Page, report: dict, rows: list[dict], source: Optional[str]) -> None:
    acc = report.get("cpt", {}).get("accounting", {})
    trained = acc.get("tokens_trained") or report.get("tokens_trained")
    if not trained:
        page.missing("report.json has no cpt.accounting")
        return
    page.plot(_plot_tokens, "tokens.png", "tokens per language and per source", acc, trained)
    total = sum(trained.values()) or 1
    page.add(*_md_table(["language", "tokens trained", "share", "target"],
                        [[k, v, f"{v / total:.1%}", acc.get("target_tokens", {}).get(k, "-")]
                         for k, v in trained.items()]), "")
    if acc.get("tokens_by_source"):
        epochs = acc.get("epochs_by_source", {})
        page.add(*_md_table(["source", "tokens trained", "epochs"],
                            [[s, v, epochs.get(s, "-")] for s, v in acc["tokens_by_source"].items()]), "")


def _tokenizer(page: _Page, report: dict, rows: list[dict], source: Optional[str]) -> None:
    tok = report.get("tokenizer")
    if tok and any(f"{lang}_chars_per_token" in tok for lang in ("ja", "en")):
        page.plot(_plot_tokenizer, "tokenizer.png", "characters per token, base vs extended tokenizer", tok)
        page.add(f"New tokens: {tok.get('new_tokens', 'n/a')}.", "")
    elif tok and tok.get("mode") == "none":
        page.add("The base model's own tokenizer was kept (`tokenizer_mode: none`). Whether extending it pays at "
                 "this compute is what `xlt compare` / `make compare` measures.", "")
    else:
        page.missing("report.json has no tokenizer section")


def _bpc(page: _Page, report: dict, rows: list[dict], source: Optional[str]) -> None:
    bpc = report.get("bpc")
    if not bpc:
        page.missing("report.json has no bpc")
        return
    page.plot(_plot_bpc, "bpc.png", "bits per character by stage", bpc)
    stages = [s for s in STAGES if any(s in row for row in bpc.values())]
    page.add(*_md_table(["language", *stages], [[lang, *(row.get(s, "-") for s in stages)]
                                                for lang, row in bpc.items()]), "")


def _mc(page: _Page, report: dict, rows: list[dict], source: Optional[str]) -> None:
    mc = {k: v for k, v in (report.get("mc") or {}).items() if isinstance(v, dict) and "accuracy" in v}
    if not mc:
        page.missing("no multiple-choice evaluation in report.json (give `mc_data` to the evaluate stage)")
        return
    page.plot(_plot_mc, "mc.png", "multiple-choice accuracy by stage", mc)
    page.add(*_md_table(["stage", "accuracy", "accuracy (normalised)", "95% CI", "n"],
                        [[s, v["accuracy"], v.get("accuracy_norm", "-"),
                          "[{:.3f}, {:.3f}]".format(*v["ci95"]) if v.get("ci95") else "-", v.get("n", "-")]
                         for s, v in mc.items()]), "")


def _speed(page: _Page, report: dict, rows: list[dict], source: Optional[str]) -> None:
    speed = _speed_rows(report.get("speed") or {})
    if not speed:
        page.missing("no generation speed in report.json (`xlt evaluate speed`)")
        return
    page.plot(_plot_speed, "speed.png", "generation speed", speed)
    metrics = sorted({m for r in speed.values() for m in r})
    page.add(*_md_table(["model", *metrics], [[n, *(r.get(m, "-") for m in metrics)] for n, r in speed.items()]), "")


# The writer of each heading of SECTIONS, in order (MT-Bench and SFT follow: their headings are their own).
_WRITERS = (_summary, _loss, _ja_share, _seq_len, _tokens, _tokenizer, _bpc, _mc, _speed)


def build_report(run_dir: str, dest: Optional[str] = None) -> str:
    """Write ``REPORT.md`` and ``plots/*.png`` for the run in ``run_dir`` into ``dest`` (default ``run_dir``);
    returns the path of REPORT.md.

    Guarantees: every heading of ``SECTIONS`` appears, in that order; a section whose figures were not
    measured says so in one line instead of a plot; only REPORT.md and ``plots/`` are written under ``dest``
    (each file atomically); nothing else in ``run_dir`` is read-modified."""
    report = _read_json(os.path.join(run_dir, "report.json"))
    if report is None:
        raise XltError(f"{os.path.join(run_dir, 'report.json')} not found (run the evaluate stage first)")
    dest = dest or run_dir
    rows, source = training_history(run_dir)
    page = _Page(os.path.join(dest, PLOTS_DIR))
    page.add(f"# Run report: {os.path.basename(os.path.abspath(run_dir))}", "")
    for title, write in zip(SECTIONS, _WRITERS):
        page.add(f"## {title}", "")
        write(page, report, rows, source)
    page.add(*_mt_bench_section(report.get("mt_bench"), page.plots))
    page.add(*_sft_section(report.get("sft") or {}))
    path = os.path.join(dest, REPORT_MD)
    atomic_write_text(path, "\n".join(page.lines))
    os.chmod(path, 0o644)
    return path
