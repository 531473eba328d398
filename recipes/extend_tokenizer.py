"""Extend (or swap) a model's tokenizer with Japanese BPE merges from a YAML recipe.

Writes OUTPUT_DIR/tokenizer (model + tokenizer + tokenizer_report.json) with the same cache key
continued pretraining uses, so `make continue-pretrain` afterwards reuses it.

    python recipes/extend_tokenizer.py --config recipes/smollm2-135m-ja/tokenizer.yaml
"""

import sys

from xlt.cli import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("extend_tokenizer"))
