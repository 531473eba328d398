"""``xlt data preview`` and ``xlt data prepare``: argparse wiring (wired into ``xlt`` by ``xlt.cli``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from xlt.config import XltError
from xlt.data.preview import KEYS, run_preview


def _run_prepare(ns: argparse.Namespace) -> int:
    from xlt.stages import prepare_data_stage

    try:
        with contextlib.redirect_stdout(sys.stderr):  # progress lines; stdout is the summary (--json: one object)
            summary = prepare_data_stage(ns.config, ns.output_dir, ns.processes)
    except XltError as e:
        print(f"xlt: error: {e}", file=sys.stderr)
        return 2
    if ns.json:
        print(json.dumps(summary))
        return 0
    for name in summary["documents"]:
        dropped = ", ".join(f"{k} {v}" for k, v in summary["dropped"][name].items() if v) or "none"
        print(f"{name}: {summary['documents'][name]:,} documents, {summary['tokens'][name]:,} tokens; "
              f"dropped: {dropped}")
    print(f"{summary['shards']} shards in {summary['seconds']:.1f}s")
    return 0


def add_data_commands(subparsers: Any) -> None:
    """Register ``xlt data preview`` and ``xlt data prepare``."""
    data = subparsers.add_parser("data", help="prepare and inspect the continued-pretraining data")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("preview", help="realised Japanese share and sequence length per step of a cpt recipe")
    p.add_argument("--config", required=True, help="cpt recipe YAML")
    p.add_argument("--steps", type=int, default=None, help="steps to preview (default: the whole run)")
    p.add_argument("--plot", default=None, help="write the curriculum plot to this PNG")
    p.add_argument("--json", action="store_true", help="print a JSON list of per-step records: " + ", ".join(KEYS))
    p.set_defaults(func=run_preview)
    p = sub.add_parser("prepare", help="tokenize a cpt recipe's sources once into token shards (datatrove)")
    p.add_argument("--config", required=True, help="cpt recipe YAML")
    p.add_argument("--output_dir", "--output-dir", default=None, help="default: the recipe's output_dir/data")
    p.add_argument("--processes", type=int, default=1, help="local processes (datatrove's local executor)")
    p.add_argument("--json", action="store_true",
                   help='print {"documents", "tokens", "dropped", "shards", "seconds"} (per source)')
    p.set_defaults(func=_run_prepare)
