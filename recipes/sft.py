"""Instruction SFT from a YAML recipe (TRL SFTTrainer; the model defaults to OUTPUT_DIR/cpt).

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/sft.py \
        --config recipes/smollm2-135m-ja/sft.yaml [--num_train_epochs 3 ...]
"""

import sys

from xlt.cli import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("sft"))
