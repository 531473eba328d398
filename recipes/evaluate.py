"""Evaluate a run directory: held-out bits per character of base / cpt / sft, a generation, report.json.

    python recipes/evaluate.py --config recipes/smollm2-135m-ja/evaluate.yaml [--output_dir DIR]
"""

import sys

from xlt.cli import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("evaluate"))
