"""Continued pretraining from a YAML recipe (tokenizer extension first, when the recipe asks for it).

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/cpt.py \
        --config recipes/smollm2-135m-ja/cpt.yaml [--learning_rate 1e-4 ...]
"""

import sys

from xlt.cli import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("cpt"))
