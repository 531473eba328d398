"""The run report: what a person reads at the end (a table) next to report.json (every figure)."""

from __future__ import annotations

from typing import Any


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of the headline figures of ``report.json``."""
    lines = []
    tok = report.get("tokenizer")
    if tok:
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
        lines.append(f"{'accuracy':<24}" + "".join(f"{mc[s]['accuracy']:>10.4f}" for s in stages))
        lines.append(f"{'accuracy (per char)':<24}" + "".join(f"{mc[s]['accuracy_norm']:>10.4f}" for s in stages))
        lines.append(f"{'95% CI':<24}" + "".join(f"{mc[s]['ci95'][0]:>5.2f}-{mc[s]['ci95'][1]:<4.2f}" for s in stages))
        lines.append(f"{'questions':<24}{n:>10}")
        lines.append("")
    trained = report.get("tokens_trained")
    if trained:
        total = sum(trained.values()) or 1
        lines.append("tokens trained: " + ", ".join(f"{k} {v:,} ({v / total:.1%})" for k, v in trained.items()))
    if "wall_seconds" in report:
        lines.append(f"wall time: {report['wall_seconds']:.0f} s")
    return "\n".join(lines)
