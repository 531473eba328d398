"""``xlt compare``: arms of one continued-pretraining recipe at equal training compute, scored per character.

    xlt compare --config recipes/smollm2-135m-ja/compare.yaml [--output_dir DIR] [--json]

A comparison file names a cpt recipe, a compute budget, the arms (each a name and recipe-key overrides) and
held-out text that is in none of the training sources::

    recipe: recipes/smollm2-135m-ja/cpt.yaml
    overrides: {seq_len: 128}              # optional: applied to every arm before its own overrides
    compute: {base_train_tokens: 32768}    # or {flops: 2.5e13}
    arms:
      - {name: base, overrides: {tokenizer_mode: none}}
      - {name: extend, overrides: {tokenizer_mode: extend, new_tokens: 1024}}
    heldout: {ja: [../shared/data/ja_wiki_paragraphs.jsonl], en: [../shared/data/en_tinyshakespeare.txt]}
    eval: {max_chars: 6000, max_docs: 200, max_length: 512, checkpoints: true, speed_prompts: 2,
           speed_max_chars: 32}

Compute. Training FLOPs of an arm = 6 * N_eff * tokens (Kaplan et al. 2020's C = 6ND, attention ignored) plus the
init cost its tokenizer stage reports (``init_flops``, ``distill_flops``: e.g. distilling new rows from the
base model). N_eff = the parameters a token's forward and backward pass multiply by: every non-embedding
parameter plus the output head's ``rows x hidden`` matmul (tied or not: a tied head is still a matmul); the
input embedding is a lookup and costs nothing. ``rows`` is the embedding rows of the arm's model after its
tokenizer stage (padding rows included: the head computes their logits too), so an extended vocabulary pays for
its larger head with fewer tokens. Each arm's ``train_tokens`` is solved so its FLOPs equal the budget, rounded
to whole optimizer steps; the arms' planned FLOPs must agree within ``compute.tolerance`` (default 1%) before
any arm trains. The budget is ``compute.flops``, or ``6 * N_eff(base) * base_train_tokens``.

Each arm is the real CPT path (the ``xlt cpt`` stage, in this process) in ``DIR/<name>/``: its tokenizer stage
first (cached there, reused by CPT), then training; the final model is ``DIR/<name>/cpt``. Every arm is scored
on the same held-out text: bits per character (``xlt.eval.bpc``) of Japanese and English at step 0 (the model
right after its tokenizer stage) and at the end (and at each complete ``checkpoint-N`` the run leaves, with
``eval.checkpoints``), Japanese characters per token of its tokenizer, and greedy generation characters per
second (``xlt.eval.speed``). Results: ``DIR/compare.json`` (a list, one row per arm), ``DIR/compare.md`` (a
table) and ``DIR/compare.png`` (bits per character against FLOPs); each arm's recipe is kept in ``DIR/recipes/<name>.yaml``
and its results in ``DIR/arms/<name>.json``. An arm whose ``DIR/<name>/cpt`` and results exist (same settings)
is not rerun; an interrupted arm resumes from its last checkpoint, and a finished arm's checkpoints are removed
once it is scored (its final model and results stay).

Sweeps and several budgets. ``sweep: {new_tokens: [0, 32, 64], overrides: {...}}`` adds the arms ``base`` (0) and
``new_tokens-32``, ``new_tokens-64`` (an extension by that many tokens, plus the sweep's overrides) before any
``arms`` listed. ``compute: {flops: [2e12, 8e12]}`` (or a list of ``base_train_tokens``) runs every arm at each
budget, in ``DIR/budget-<k>``; an arm's tokenizer stage and step-0 scores do not depend on the budget, so they are
made at the first budget and reused by the later ones (the stage folder hard-linked). Every row then says whether
it has its budget's lowest Japanese bits per character (``best_at_budget``), whether it is on the Pareto front of
(Japanese bits per character, Japanese characters per token) (``on_pareto_front``), and carries the budget's
``recommendation``: how many new tokens pay (an extended arm at or below the base arm's Japanese bits per
character) and the inference speed-up they buy, or none and by how much the best extended arm misses. With three
budgets or more, each extended arm's row also carries its ``crossing``: the straight line through its gap to the
base arm against log2 FLOPs, and the budget where that line would reach zero (``crossings``).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from xlt import stages
from xlt.config import CptRecipe, XltError, cpt_recipe_types
from xlt.flops import (  # noqa: F401
    effective_params,
    flops_spread,
    model_effective_params,
    model_partial_flops,
    partial_steps,
    solve_tokens,
    training_flops,
)
from xlt.io import atomic_write_json, resolve_shared
from xlt.log import logger

#: Recipe keys an arm may not set: the comparison owns them.
OWNED_KEYS = ("output_dir", "train_tokens", "max_steps")
TOP_KEYS = ("recipe", "output_dir", "compute", "overrides", "arms", "sweep", "heldout", "eval")
COMPUTE_KEYS = ("flops", "base_train_tokens", "tolerance")
ARM_KEYS = ("name", "overrides")
LANGS = ("ja", "en")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: ``../shared/data/`` in a held-out path is read from ``$XLT_SHARED_DATA`` when that is set.


@dataclasses.dataclass
class EvalSettings:
    """How every arm is scored (the same for all arms)."""

    max_chars: int = 6000         # held-out characters per language (whole documents, in file order)
    max_docs: int = 200           # documents read per held-out file
    max_length: int = 512         # bits-per-character window, tokens
    batch_size: int = 4
    checkpoints: bool = True      # also score the complete checkpoint-N the run leaves (the curve)
    speed_prompts: int = 2        # generation speed: first N built-in Japanese prompts (0 skips it)
    speed_max_chars: int = 32     # characters generated per prompt


@dataclasses.dataclass
class Arm:
    name: str
    overrides: dict
    recipe: dict                  # the cpt recipe mapping this arm runs (train_tokens / output_dir set later)


@dataclasses.dataclass
class CompareConfig:
    path: str
    recipe_path: str
    output_dir: str
    flops: Optional[float]
    base_train_tokens: Optional[int]
    tolerance: float
    arms: list[Arm]
    heldout: dict[str, list[str]]
    eval: EvalSettings
    amounts: tuple[float, ...] = ()  # every budget given (``compute.flops`` / ``base_train_tokens`` as a list)

    @property
    def budgets(self) -> int:
        return len(self.amounts) or 1


_log = logger("xlt compare")


def cpt_types() -> list[type]:
    """The dataclasses of a cpt recipe: the same list ``xlt cpt`` parses with."""
    return cpt_recipe_types()


# ---------------------------------------------------------------------------------------------------------
# The comparison file: every check before any model loads
# ---------------------------------------------------------------------------------------------------------
def _yaml_mapping(path: str, what: str) -> dict:
    from xlt.config import read_recipe_yaml

    if not os.path.isfile(path):
        raise XltError(f"{what} not found: {path}")
    return read_recipe_yaml(path)


def _positive_number(value: Any, key: str) -> float:
    from xlt.plan import parse_number

    if isinstance(value, bool):
        raise XltError(f"{key}: expected a positive number, got {value!r}")
    x = parse_number(value, key)
    if not x > 0:
        raise XltError(f"{key}: must be > 0, got {value!r}")
    return x


def _eval_settings(raw: Any, where: str) -> EvalSettings:
    if raw is None:
        return EvalSettings()
    if not isinstance(raw, dict):
        raise XltError(f"{where}: eval must be a mapping")
    known = {f.name: f for f in dataclasses.fields(EvalSettings)}
    out = EvalSettings()
    for k, v in raw.items():
        if k not in known:
            raise XltError(f"{where}: unknown eval key {k!r} (known: {', '.join(known)})")
        if known[k].type in ("bool", bool):
            if not isinstance(v, bool):
                raise XltError(f"{where}: eval.{k} must be true or false, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "speed_prompts" else 1):
            raise XltError(f"{where}: eval.{k} must be an integer >= {0 if k == 'speed_prompts' else 1}, got {v!r}")
        setattr(out, k, v)
    if out.max_length < 2:
        raise XltError(f"{where}: eval.max_length must be at least 2, got {out.max_length}")
    return out


def _heldout(raw: Any, where: str) -> dict[str, list[str]]:
    if not isinstance(raw, dict):
        raise XltError(f"{where}: heldout must be a mapping {{ja: [files], en: [files]}}")
    for k in raw:
        if k not in LANGS:
            raise XltError(f"{where}: heldout.{k}: unknown language (expected ja and en)")
    out = {}
    for lang in LANGS:
        files = raw.get(lang)
        if isinstance(files, str):
            files = [files]
        if not files or not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise XltError(f"{where}: heldout.{lang}: expected a list of files")
        resolved = []
        for f in files:
            p = resolve_shared(f)
            if not os.path.isfile(p):
                raise XltError(f"{where}: heldout.{lang}: file not found: {p}")
            resolved.append(p)
        out[lang] = resolved
    return out


def _arms(raw: Any, where: str, common: dict, recipe: dict, known_keys: set[str]) -> list[Arm]:
    if not isinstance(raw, list) or not raw:
        raise XltError(f"{where}: arms must be a non-empty list of {{name, overrides}} (or give a sweep)")
    arms: list[Arm] = []
    seen: set[str] = set()
    for i, a in enumerate(raw):
        at = f"{where}: arms[{i}]"
        if not isinstance(a, dict):
            raise XltError(f"{at}: expected a mapping with name and overrides")
        for k in a:
            if k not in ARM_KEYS:
                raise XltError(f"{at}: unknown arm key {k!r} (expected name, overrides)")
        name = a.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise XltError(f"{at}: name must be a folder name (letters, digits, _ . -), got {name!r}")
        if name in seen:
            raise XltError(f"{at}: duplicate arm name {name!r}")
        seen.add(name)
        overrides = a.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise XltError(f"{at} ({name}): overrides must be a mapping of recipe key: value")
        _check_override_keys(overrides, f"{at} ({name})", known_keys)
        merged = {**recipe, **common, **overrides}
        arms.append(Arm(name, dict(overrides), merged))
    base = [a for a in arms if a.name == "base"]
    if not base:
        raise XltError(f"{where}: no arm named 'base' (the arm with the original tokenizer)")
    mode = base[0].recipe.get("tokenizer_mode", "none")
    if mode != "none":
        raise XltError(f"{where}: arm 'base' must keep the original tokenizer (tokenizer_mode: none), has {mode!r}")
    return arms


def sweep_arms(raw: Any, where: str) -> list[dict]:
    """The arms a ``sweep`` mapping stands for: ``{new_tokens: [0, 32, 64], overrides: {...}}`` gives ``base``
    (0: the original tokenizer) and ``new_tokens-32``, ``new_tokens-64`` (``tokenizer_mode: extend`` unless the
    sweep's ``overrides`` say otherwise, then those overrides). Any other single recipe key sweeps the same way
    (``<key>-<value>`` arms, no base)."""
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise XltError(f"{where}: sweep must be a mapping {{key: [values], overrides: {{...}}}}")
    common = raw.get("overrides") or {}
    if not isinstance(common, dict):
        raise XltError(f"{where}: sweep.overrides must be a mapping of recipe key: value")
    keys = [k for k in raw if k != "overrides"]
    if len(keys) != 1 or not isinstance(raw[keys[0]], list) or not raw[keys[0]]:
        raise XltError(f"{where}: sweep: give one recipe key with a non-empty list of values (e.g. new_tokens: [0, 64])")
    key, values = keys[0], raw[keys[0]]
    if len(set(map(str, values))) != len(values):
        raise XltError(f"{where}: sweep.{key}: repeated values {values}")
    arms = []
    for v in values:
        if key == "new_tokens":
            if type(v) is not int or v < 0:
                raise XltError(f"{where}: sweep.new_tokens: expected whole numbers >= 0, got {v!r}")
            if v == 0:
                arms.append({"name": "base", "overrides": {"tokenizer_mode": "none"}})
                continue
            arms.append({"name": f"new_tokens-{v}", "overrides": {"tokenizer_mode": "extend", **common, "new_tokens": v}})
        else:
            arms.append({"name": f"{key}-{v}", "overrides": {**common, key: v}})
    return arms


def _amounts(value: Any, key: str, where: str) -> list[float]:
    """One budget or a list of them (``compute.flops: [1e12, 1e13]``), each a positive number."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise XltError(f"{where}: compute.{key}: an empty list")
    out = [_positive_number(v, f"compute.{key}") for v in values]
    if len(set(out)) != len(out):
        raise XltError(f"{where}: compute.{key}: repeated budgets {values}")
    return out


def _check_override_keys(overrides: Mapping[str, Any], at: str, known_keys: set[str]) -> None:
    for k in overrides:
        if k in OWNED_KEYS:
            raise XltError(f"{at}: {k} is set by the comparison (compute budget / output folder); remove it")
        if k not in known_keys:
            raise XltError(f"{at}: unknown recipe key {k!r}")
        if k == "kd_weight" and overrides[k]:
            # The teacher's FLOPs depend on how many old pieces it reads, known only after training, so the
            # arm's tokens cannot be solved for the budget up front: refused rather than compared unequally.
            raise XltError(f"{at}: kd_weight: a distillation term's teacher FLOPs are known only after training, so "
                           "the arm cannot be held to the shared budget; compare it outside xlt compare")


def _training_paths(recipe: Mapping[str, Any]) -> set[str]:
    """Absolute paths of the local files an arm trains on (sources, tokenizer_corpus)."""
    import glob

    out: set[str] = set()
    for key in ("sources", "tokenizer_corpus"):
        for spec in recipe.get(key) or []:
            if isinstance(spec, dict) and isinstance(spec.get("path"), str):
                for p in glob.glob(spec["path"]) or [spec["path"]]:
                    out.add(os.path.realpath(p))
    return out


def load_config(path: str, output_dir: Optional[str] = None) -> CompareConfig:
    """Read and check a comparison file; raises a one-line ``XltError`` before any model loads.

    Guarantees: arm names are unique folder names and one is ``base`` with ``tokenizer_mode: none``; every
    override is a recipe key the comparison does not own; every arm's recipe parses (types, ranges) and passes
    continued pretraining's input checks; the budget is one positive number; every held-out file exists and is
    no training source of any arm.
    """
    from xlt.train.cpt import check_cpt_inputs
    from xlt.train.partial import partial_settings
    from xlt.train.runtime import Launcher
    from xlt.validate import recipe_annotations

    raw = _yaml_mapping(path, "comparison file")
    for k in raw:
        if k not in TOP_KEYS:
            raise XltError(f"{path}: unknown key {k!r} (known: {', '.join(TOP_KEYS)})")
    recipe_path = raw.get("recipe")
    if not isinstance(recipe_path, str):
        raise XltError(f"{path}: recipe: give the cpt recipe file")
    recipe = _yaml_mapping(recipe_path, "recipe")
    known = set(recipe_annotations(cpt_types()))
    common = raw.get("overrides") or {}
    if not isinstance(common, dict):
        raise XltError(f"{path}: overrides must be a mapping of recipe key: value")
    _check_override_keys(common, f"{path}: overrides", known)

    compute = raw.get("compute")
    if not isinstance(compute, dict):
        raise XltError(f"{path}: compute: give flops or base_train_tokens")
    for k in compute:
        if k not in COMPUTE_KEYS:
            raise XltError(f"{path}: unknown compute key {k!r} (known: {', '.join(COMPUTE_KEYS)})")
    given = [k for k in ("flops", "base_train_tokens") if k in compute]
    if len(given) != 1:
        raise XltError(f"{path}: compute: give exactly one of flops or base_train_tokens")
    amounts = _amounts(compute[given[0]], given[0], path)
    amount = amounts[0]
    tolerance = _positive_number(compute.get("tolerance", 0.01), "compute.tolerance")

    arms = _arms(sweep_arms(raw.get("sweep"), path) + list(raw.get("arms") or []), path, common, recipe, known)
    heldout = _heldout(raw.get("heldout"), path)
    settings = _eval_settings(raw.get("eval"), path)
    out = output_dir or raw.get("output_dir") or "runs/compare"
    if not isinstance(out, str):
        raise XltError(f"{path}: output_dir must be a folder path")

    for lang, files in heldout.items():
        for f in files:
            for arm in arms:
                if os.path.realpath(f) in _training_paths(arm.recipe):
                    raise XltError(f"{path}: heldout.{lang}: {f} is a training source of arm {arm.name!r}; "
                                   "held-out text must come from outside the training data")
    launcher = Launcher.from_env()
    with tempfile.TemporaryDirectory(prefix="xlt-compare-") as tmp:
        for arm in arms:
            try:
                parsed = parse_arm(arm, os.path.join(tmp, arm.name), 1, tmp)
                check_cpt_inputs(parsed.model, parsed.tokenizer, parsed.data, parsed.cpt, parsed.training)
                partial_settings(parsed.cpt, 1, False, launcher.world_size, launcher.kind)
            except XltError as e:
                raise XltError(f"{path}: arm {arm.name!r}: {e}") from None
    return CompareConfig(path, recipe_path, out, amount if given[0] == "flops" else None,
                         int(amount) if given[0] == "base_train_tokens" else None, tolerance, arms, heldout, settings,
                         amounts=tuple(amounts))


def budget_configs(cfg: CompareConfig) -> list[CompareConfig]:
    """One comparison per budget: the config itself for one budget; for several, each budget's arms in
    ``DIR/budget-<k>`` (k from 1, in the order given), the same arms, held-out text and evaluation."""
    if cfg.budgets == 1:
        return [cfg]
    flops_given = cfg.flops is not None
    return [dataclasses.replace(cfg, output_dir=os.path.join(cfg.output_dir, f"budget-{k + 1}"),
                                amounts=(a,), flops=a if flops_given else None,
                                base_train_tokens=None if flops_given else int(a))
            for k, a in enumerate(cfg.amounts)]


def arm_recipe(arm: Arm, output_dir: str, train_tokens: int) -> dict:
    """The cpt recipe mapping the arm runs: the recipe, the common and the arm's overrides, its folder, its tokens."""
    return {**arm.recipe, "output_dir": output_dir, "train_tokens": int(train_tokens)}


def parse_arm(arm: Arm, output_dir: str, train_tokens: int, recipe_dir: str) -> CptRecipe:
    """Write the arm's recipe to ``recipe_dir/<name>.yaml`` (atomically) and parse it as ``xlt cpt`` would."""
    import yaml

    from xlt.io import atomic_write_text

    path = os.path.join(recipe_dir, f"{arm.name}.yaml")
    atomic_write_text(path, yaml.safe_dump(arm_recipe(arm, output_dir, train_tokens), allow_unicode=True,
                                            sort_keys=False))
    return CptRecipe.parse(["--config", path])


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------
def read_heldout(heldout: Mapping[str, Sequence[str]], settings: EvalSettings) -> dict[str, list[str]]:
    """Per language, whole documents of its files in order until ``max_chars`` characters (at least one)."""
    from xlt.data.sources import read_documents

    out: dict[str, list[str]] = {}
    for lang, files in heldout.items():
        docs: list[str] = []
        chars = 0
        for f in files:
            for d in read_documents(f, max_docs=settings.max_docs, key=f"heldout.{lang}"):
                if not d.strip():
                    continue
                if docs and chars + len(d) > settings.max_chars:
                    break
                docs.append(d)
                chars += len(d)
            if chars >= settings.max_chars:
                break
        if not docs:
            raise XltError(f"heldout.{lang}: no non-empty document in {', '.join(files)}")
        out[lang] = docs
    return out


def score_model(model_dir: str, texts: Mapping[str, list[str]], settings: EvalSettings, speed: bool = False,
                trust_remote_code: bool = False) -> dict:
    """Bits per character per language, Japanese chars per token and (``speed``) generation chars/s of a model."""
    import torch

    from xlt.eval.bpc import bits_per_char
    from xlt.models import load_model, load_tokenizer

    tok = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    model = load_model(model_dir, torch_dtype="float32", trust_remote_code=trust_remote_code)
    out: dict[str, Any] = {}
    with torch.inference_mode():
        for lang, docs in texts.items():
            r = bits_per_char(model, tok, docs, max_length=settings.max_length, batch_size=settings.batch_size)
            out[f"{lang}_bpc"] = round(r["bits_per_char"], 4)
            out[f"{lang}_chars_per_token"] = round(r["chars"] / max(r["tokens"], 1), 4)
    if speed and settings.speed_prompts > 0:
        from xlt.eval.speed import DEFAULT_PROMPTS, generation_speed

        s = generation_speed(model, tok, DEFAULT_PROMPTS[: settings.speed_prompts], settings.speed_max_chars)
        out["chars_per_second"] = round(s["chars_per_second"], 2)
        out["gen_chars_per_token"] = round(s["chars_per_token"], 4)
    del model
    gc.collect()
    return out


def _complete_checkpoints(run_dir: str, final_step: int) -> list[tuple[int, str]]:
    from xlt.train.checkpoint import STATE_FILE

    out = []
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            m = re.fullmatch(r"checkpoint-(\d+)", name)
            path = os.path.join(run_dir, name)
            if m and 0 < int(m.group(1)) < final_step and os.path.isfile(os.path.join(path, STATE_FILE)) \
                    and os.path.isfile(os.path.join(path, "config.json")):
                out.append((int(m.group(1)), path))
    return sorted(out)


# ---------------------------------------------------------------------------------------------------------
# Running the arms
# ---------------------------------------------------------------------------------------------------------
def _read_json(path: str) -> Optional[Any]:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _result_path(cfg: CompareConfig, arm: Arm) -> str:
    """``DIR/arms/<name>.json``: outside ``DIR/<name>``, which the cpt stage claims as its own run folder."""
    return os.path.join(cfg.output_dir, "arms", f"{arm.name}.json")


def _arm_identity(cfg: CompareConfig, arm: Arm, budget_spec: dict) -> dict:
    """What an arm's cached results depend on: its recipe, the budget, the held-out files and eval settings."""
    return json.loads(json.dumps({"recipe": arm.recipe, "budget": budget_spec, "heldout": cfg.heldout,
                                  "eval": dataclasses.asdict(cfg.eval)}, default=str))


def _link_tree(src: str, dst: str) -> None:
    """``dst`` as a copy of the folder ``src`` made of hard links (a plain copy where the file system has none),
    swapped into place whole. Safe to share: every writer of a stage folder replaces the folder or its files
    (``atomic_save_dir``, atomic writes), none writes into a file in place."""
    from xlt.io import atomic_save_dir

    atomic_save_dir(lambda tmp: shutil.copytree(src, tmp, copy_function=_link_or_copy, dirs_exist_ok=True), dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _same_arm(a: dict, b: dict) -> bool:
    """Two arm identities that differ at most in the budget: the same tokenizer stage and step-0 scores."""
    return {k: v for k, v in a.items() if k != "budget"} == {k: v for k, v in b.items() if k != "budget"}


def _reuse_step0(cfg: CompareConfig, arm: Arm, earlier: dict, identity: dict) -> dict:
    """Phase 1 of an arm at a later budget: the first budget's tokenizer stage (linked into this budget's run
    folder, where continued pretraining reuses it by its key) and its step-0 scores, which do not depend on the
    budget; nothing is rebuilt or scored again."""
    from xlt.train.checkpoint import RUN_FILE, claim_output_dir

    run_dir = os.path.join(cfg.output_dir, arm.name)
    step0_dir = earlier["step0_dir"]
    source_run = os.path.dirname(step0_dir)
    stage = (_read_json(os.path.join(source_run, RUN_FILE)) or {}).get("tokenizer")
    if stage is not None and os.path.basename(step0_dir) == "tokenizer":
        _log(f"{arm.name}: tokenizer stage and step-0 scores of {source_run}")
        claim_output_dir(run_dir, "tokenizer", stage)
        step0_dir = os.path.join(run_dir, "tokenizer")
        _link_tree(earlier["step0_dir"], step0_dir)
    result = {**{k: earlier[k] for k in ("init_flops", "params", "partial", "step0") if k in earlier},
              "identity": identity, "name": arm.name, "step0_dir": step0_dir, "step0_eval_seconds": 0.0,
              "step0_from": earlier["step0_dir"]}
    atomic_write_json(_result_path(cfg, arm), result)
    return result


def _prepare_arm(cfg: CompareConfig, arm: Arm, texts: dict, identity: dict, earlier: Optional[dict] = None) -> dict:
    """Phase 1 of an arm: its tokenizer stage and the step-0 scores (cached in ``DIR/arms/<name>.json``); taken
    from ``earlier`` (the same arm's phase 1 at an earlier budget) when that differs only in the budget."""
    from xlt.train.cpt import run_tokenizer_stage

    run_dir = os.path.join(cfg.output_dir, arm.name)
    result_path = _result_path(cfg, arm)
    result = _read_json(result_path)
    if result is not None and result.get("identity") != identity:
        raise XltError(f"{run_dir} holds a different arm {arm.name!r} (recipe, budget or evaluation changed); "
                       "use another --output_dir or delete it")
    if result is not None and "step0" in result:
        return result
    if earlier is not None and "step0" in earlier and _same_arm(earlier["identity"], identity) \
            and os.path.isdir(earlier["step0_dir"]):
        return _reuse_step0(cfg, arm, earlier, identity)
    parsed = parse_arm(arm, run_dir, 1, os.path.join(cfg.output_dir, "recipes"))
    model_args, tok_args, data_args, cpt_args = parsed.model, parsed.tokenizer, parsed.data, parsed.cpt
    init_flops = 0.0
    if tok_args.tokenizer_mode == "none":
        from xlt.models import resolve_model

        step0_dir = resolve_model(model_args.model)
    else:
        _log(f"{arm.name}: tokenizer stage ({tok_args.tokenizer_mode})")
        out = type("Out", (), {"output_dir": run_dir})()
        report = run_tokenizer_stage(model_args, tok_args, data_args, cpt_args, out)
        init_flops = float(report.get("init_flops", 0) or 0) + float(report.get("distill_flops", 0) or 0)
        step0_dir = os.path.join(run_dir, "tokenizer")
    _log(f"{arm.name}: scoring step 0 ({step0_dir})")
    t0 = time.time()
    step0 = score_model(step0_dir, texts, cfg.eval, trust_remote_code=model_args.trust_remote_code)
    result = {"identity": identity, "name": arm.name, "step0_dir": step0_dir, "init_flops": init_flops,
              "params": model_effective_params(step0_dir, model_args.trust_remote_code),
              "partial": partial_cost(step0_dir, cpt_args, model_args.trust_remote_code),
              "step0": step0, "step0_eval_seconds": round(time.time() - t0, 1)}
    atomic_write_json(result_path, result)
    return result


def partial_cost(model_dir: str, cpt_args: Any, trust_remote_code: bool = False) -> Optional[dict]:
    """An arm's partial-training phase as its FLOPs count needs it (None without one): the keys, and the FLOPs
    per token while it lasts (xlt/flops.py: 6 per trainable, 4 per frozen parameter below which something trains)."""
    frac = cpt_args.partial_training_fraction
    if not frac:
        return None
    first, last = cpt_args.train_layers_first, cpt_args.train_layers_last
    return {"train_layers_first": first, "train_layers_last": last, "fraction": frac,
            "flops_per_token": model_partial_flops(model_dir, first, last, trust_remote_code)}


def arm_flops(result: dict, tokens: float, steps: int, tokens_per_step: int) -> float:
    """Training FLOPs of an arm (of ``steps`` planned steps) after ``tokens``: its partial phase (the first
    ``partial_steps`` of the run) at its own FLOPs per token, the rest at ``6 * N_eff``, plus the init cost."""
    partial = result.get("partial")
    n_eff, init = result["params"]["n_eff"], result["init_flops"]
    if not partial:
        return training_flops(n_eff, tokens, init)
    return training_flops(n_eff, tokens, init, partial_steps(partial["fraction"], steps) * tokens_per_step,
                          partial["flops_per_token"])


def _train_arm(cfg: CompareConfig, arm: Arm, plan: dict, texts: dict, result: dict) -> dict:
    """Phase 2 of an arm: continued pretraining for its solved tokens, then the end (and checkpoint) scores."""
    from xlt.train.checkpoint import STATE_FILE, remove_checkpoints

    run_dir = os.path.join(cfg.output_dir, arm.name)
    final = os.path.join(run_dir, "cpt")
    if "end" in result and os.path.isfile(os.path.join(final, "config.json")):
        _log(f"{arm.name}: done before (results and {final} exist); not rerun")
        remove_checkpoints(run_dir)
        return result
    recipe_dir = os.path.join(cfg.output_dir, "recipes")
    parse_arm(arm, run_dir, plan["tokens"], recipe_dir)  # writes the recipe file the stage reads
    _log(f"{arm.name}: continued pretraining, {plan['steps']} steps = {plan['tokens']:,} tokens "
         f"({plan['flops']:.3g} FLOPs)")
    t0 = time.time()
    stages.recipe_stage("cpt")(["--config", os.path.join(recipe_dir, f"{arm.name}.yaml")])
    train_seconds = time.time() - t0
    gc.collect()
    report = _read_json(os.path.join(run_dir, "report.json")) or {}
    trained = int(sum((report.get("tokens_trained") or {}).values())) or plan["tokens"]
    extra = float((report.get("cpt") or {}).get("distill_flops", 0) or 0)
    init, tps = result["init_flops"], plan["tokens"] // plan["steps"]
    curve = [{"step": 0, "tokens": 0, "flops": init, **{f"{lang}_bpc": result["step0"][f"{lang}_bpc"]
                                                          for lang in texts}}]
    if cfg.eval.checkpoints:
        for step, path in _complete_checkpoints(run_dir, plan["steps"]):
            _log(f"{arm.name}: scoring {os.path.basename(path)}")
            s = score_model(path, texts, cfg.eval)
            state = _read_json(os.path.join(path, STATE_FILE)) or {}
            done = int(sum((state.get("accounting") or {}).get("tokens_trained", {}).values())) or step * tps
            curve.append({"step": step, "tokens": done, "flops": arm_flops(result, done, plan["steps"], tps),
                          **{f"{lang}_bpc": s[f"{lang}_bpc"] for lang in texts}})
    _log(f"{arm.name}: scoring the final model")
    t1 = time.time()
    end = score_model(final, texts, cfg.eval, speed=True)
    flops = arm_flops(result, trained, plan["steps"], tps) + extra
    curve.append({"step": plan["steps"], "tokens": trained, "flops": flops,
                  **{f"{lang}_bpc": end[f"{lang}_bpc"] for lang in texts}})
    result.update({"plan": plan, "end": end, "curve": curve, "tokens": trained, "flops": flops,
                   "train_seconds": round(train_seconds, 1), "end_eval_seconds": round(time.time() - t1, 1),
                   "model_dir": final})
    atomic_write_json(_result_path(cfg, arm), result)
    # Its checkpoints served resuming and the curve, both done now; each holds the weights and the optimizer state
    # (1.6 GB for a 135M model).
    remove_checkpoints(run_dir)
    return result


def plan_arms(cfg: CompareConfig, prepared: dict[str, dict]) -> tuple[float, dict[str, dict]]:
    """The budget and each arm's ``{"steps", "tokens", "flops", "tokens_per_step"}``; refuses a FLOPs spread
    above ``cfg.tolerance`` (too few steps to share the budget evenly) before any arm trains."""
    from xlt.data.steps import plan_steps
    from xlt.train.runtime import Launcher

    tps: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="xlt-compare-") as tmp:
        for arm in cfg.arms:
            parsed = parse_arm(arm, os.path.join(tmp, arm.name), 1, tmp)
            tps[arm.name] = plan_steps(parsed.data, parsed.cpt, parsed.training,
                                       Launcher.from_env().world_size).tokens_per_step
    budget = cfg.flops if cfg.flops is not None else \
        training_flops(prepared["base"]["params"]["n_eff"], cfg.base_train_tokens, prepared["base"]["init_flops"])
    plans = {}
    for arm in cfg.arms:
        p = prepared[arm.name]
        try:
            partial = p.get("partial")
            steps, tokens = solve_tokens(budget, p["params"]["n_eff"], p["init_flops"], tps[arm.name],
                                         (partial["fraction"], partial["flops_per_token"]) if partial else None)
        except XltError as e:
            raise XltError(f"arm {arm.name!r}: {e}") from None
        plans[arm.name] = {"steps": steps, "tokens": tokens, "tokens_per_step": tps[arm.name],
                           "flops": arm_flops(p, tokens, steps, tps[arm.name])}
    spread = flops_spread([p["flops"] for p in plans.values()])
    if spread > cfg.tolerance:
        detail = ", ".join(f"{n} {p['steps']} steps" for n, p in plans.items())
        raise XltError(f"compute: the arms' FLOPs differ by {spread:.1%} (> tolerance {cfg.tolerance:.1%}) at whole "
                       f"steps ({detail}); raise the budget or lower tokens per step")
    return budget, plans


def _row(arm: Arm, r: dict, budget: float) -> dict:
    end, step0 = r["end"], r["step0"]
    new_tokens = 0 if arm.recipe.get("tokenizer_mode", "none") == "none" else int(arm.recipe.get("new_tokens") or 0)
    return {"name": arm.name, "overrides": arm.overrides, "flops": r["flops"], "budget_flops": budget,
            "new_tokens": new_tokens, "tokenizer_mode": arm.recipe.get("tokenizer_mode", "none"),
            "init_flops": r["init_flops"], "tokens": r["tokens"], "steps": r["plan"]["steps"],
            "n_eff": r["params"]["n_eff"], "head_rows": r["params"]["head_rows"], "partial_training": r.get("partial"),
            "ja_bpc": end["ja_bpc"], "en_bpc": end["en_bpc"],
            "ja_bpc_step0": step0["ja_bpc"], "en_bpc_step0": step0["en_bpc"],
            "ja_chars_per_token": end["ja_chars_per_token"], "en_chars_per_token": end["en_chars_per_token"],
            "chars_per_second": end.get("chars_per_second"), "curve": r["curve"],
            "train_seconds": r["train_seconds"], "model_dir": r["model_dir"]}


def run_compare(config_path: str, output_dir: Optional[str] = None) -> tuple[list[dict], str]:
    """Run (or resume) every arm at every budget and write ``DIR/compare.json``, ``compare.md`` and
    ``compare.png``; returns the rows of compare.json (each with its budget's summary, ``summarise``) and DIR."""
    cfg = load_config(config_path, output_dir)
    texts = read_heldout(cfg.heldout, cfg.eval)
    first: dict[str, dict] = {}  # each arm's phase 1 at the first budget, reused by the later ones
    rows = [r for sub in budget_configs(cfg) for r in _run_budget(sub, texts, first)]
    summarise(rows)
    write_outputs(cfg.output_dir, rows, texts)
    return rows, cfg.output_dir


def _run_budget(cfg: CompareConfig, texts: dict[str, list[str]], first: dict[str, dict]) -> list[dict]:
    _log(f"{len(cfg.arms)} arms into {cfg.output_dir}; held-out " +
         ", ".join(f"{lang} {len(d)} documents / {sum(map(len, d)):,} characters" for lang, d in texts.items()))
    budget_spec = {"flops": cfg.flops, "base_train_tokens": cfg.base_train_tokens, "tolerance": cfg.tolerance}
    prepared = {a.name: _prepare_arm(cfg, a, texts, _arm_identity(cfg, a, budget_spec), first.get(a.name))
                for a in cfg.arms}
    for name, p in prepared.items():
        first.setdefault(name, p)
    budget, plans = plan_arms(cfg, prepared)
    _log(f"budget {budget:.4g} FLOPs; " + ", ".join(f"{n}: {p['tokens']:,} tokens" for n, p in plans.items()))
    return [_row(arm, _train_arm(cfg, arm, plans[arm.name], texts, prepared[arm.name]), budget) for arm in cfg.arms]


# ---------------------------------------------------------------------------------------------------------
# Per budget: the best arm, the Pareto front, how many new tokens pay
# ---------------------------------------------------------------------------------------------------------
def pareto_front(rows: Sequence[dict]) -> list[str]:
    """Names of the arms no other arm beats on both Japanese bits per character (lower) and Japanese characters per
    token (higher, the inference cost), in the rows' order."""
    def dominated(r: dict) -> bool:
        return any(o["ja_bpc"] <= r["ja_bpc"] and o["ja_chars_per_token"] >= r["ja_chars_per_token"]
                   and (o["ja_bpc"], o["ja_chars_per_token"]) != (r["ja_bpc"], r["ja_chars_per_token"]) for o in rows)
    return [r["name"] for r in rows if not dominated(r)]


def recommendation(rows: Sequence[dict]) -> dict:
    """How many new tokens pay at one budget: the extended arm (``new_tokens`` > 0) with the lowest Japanese bits
    per character among those at or below the original tokenizer's (the ``base`` arm), and the inference speed-up
    its tokenizer buys (Japanese characters per token, and measured generation characters per second, over the
    base's); or none, with how far the best extended arm misses."""
    base = next((r for r in rows if r["name"] == "base"), None)
    extended = [r for r in rows if r.get("new_tokens", 0) > 0]
    rec: dict[str, Any] = {"budget_flops": rows[0]["budget_flops"], "new_tokens": 0, "arm": None}
    if base is None or not extended:
        rec["text"] = "no base arm and extended arms to weigh at this budget"
        return rec
    paying = [r for r in extended if r["ja_bpc"] <= base["ja_bpc"]]
    best = min(paying or extended, key=lambda r: (r["ja_bpc"], -r["new_tokens"]))
    delta = best["ja_bpc"] - base["ja_bpc"]
    speed = best["ja_chars_per_token"] / base["ja_chars_per_token"]
    cps = None
    if best.get("chars_per_second") and base.get("chars_per_second"):
        cps = best["chars_per_second"] / base["chars_per_second"]
    rec.update(ja_bpc_delta=round(delta, 4), speedup_chars_per_token=round(speed, 3),
               speedup_chars_per_second=None if cps is None else round(cps, 3))
    if paying:
        rec.update(new_tokens=best["new_tokens"], arm=best["name"])
        rec["text"] = (f"{best['new_tokens']} new tokens pay ({best['name']}: {delta:+.3f} Japanese bits/char against "
                       f"the original tokenizer); Japanese text takes {speed:.2f}x fewer tokens")
    else:
        rec["text"] = (f"none at this budget: the best extended arm ({best['name']}, {best['new_tokens']} new tokens) "
                       f"is {delta:+.3f} Japanese bits/char behind the original tokenizer")
    return rec


def crossings(rows: Sequence[dict]) -> dict[str, dict]:
    """Where each extended arm would meet the original tokenizer, extrapolated from the budgets measured.

    Per extended arm (``new_tokens`` > 0) present with the ``base`` arm at three budgets or more: the least-squares
    line through its gap to the base arm (Japanese bits per character, arm minus base) against log2 of the budget's
    FLOPs, i.e. how much of the gap each doubling of compute closes, and the budget where that line reaches zero
    (``crossing_flops``; also as tokens of the base arm, ``crossing_base_tokens`` = FLOPs / (6 · N_eff of base))
    or None when the gap does not shrink. ``max_residual`` is the largest distance of a measured gap from the
    line: how far to trust the straight line. Arms at fewer than three budgets get no entry."""
    gaps: dict[str, list[tuple[float, float]]] = {}
    n_eff_base = None
    new_tokens: dict[str, int] = {}
    for group in by_budget(rows).values():
        base = next((r for r in group if r["name"] == "base"), None)
        if base is None:
            continue
        n_eff_base = base.get("n_eff", n_eff_base)
        for r in group:
            if r.get("new_tokens", 0) > 0:
                gaps.setdefault(r["name"], []).append((math.log2(r["budget_flops"]), r["ja_bpc"] - base["ja_bpc"]))
                new_tokens[r["name"]] = r["new_tokens"]
    out: dict[str, dict] = {}
    for name, pts in gaps.items():
        if len({x for x, _ in pts}) < 3:
            continue
        n = len(pts)
        mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
        slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
        at = my - slope * mx  # the gap at 1 FLOP (log2 = 0)
        residual = max(abs(y - (at + slope * x)) for x, y in pts)
        flops = 2.0 ** (-at / slope) if slope < 0 else None
        entry = {"arm": name, "new_tokens": new_tokens[name], "budgets": n,
                 "gaps": [round(y, 4) for _, y in sorted(pts)], "gap_per_doubling": round(slope, 4),
                 "max_residual": round(residual, 4), "crossing_flops": flops,
                 "crossing_base_tokens": (round(flops / (6 * n_eff_base)) if flops is not None and n_eff_base
                                          else None)}
        last_x, last_gap = max(pts)
        if flops is None:
            entry["text"] = (f"{name}: the gap does not shrink with compute ({slope:+.3f} bits/char per doubling "
                             f"over {n} budgets): no crossing in sight")
        elif last_gap <= 0:
            entry["text"] = f"{name}: already at or below the original tokenizer at {2.0 ** last_x:.3g} FLOPs"
        else:
            toks = f" (~{entry['crossing_base_tokens']:.3g} tokens of the base arm)" if entry["crossing_base_tokens"] \
                else ""
            entry["text"] = (f"{name}: {slope:+.3f} bits/char per doubling of compute; would meet the original "
                             f"tokenizer at ~{flops:.3g} FLOPs{toks}, {flops / 2.0 ** last_x:.3g}x the largest budget "
                             f"(straight line in log FLOPs through {n} budgets, max residual {residual:.3f})")
        out[name] = entry
    return out


def by_budget(rows: Sequence[dict]) -> dict[float, list[dict]]:
    """The rows grouped by their budget, in the order the budgets first appear."""
    groups: dict[float, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["budget_flops"], []).append(r)
    return groups


def summarise(rows: list[dict]) -> None:
    """Add to every row its budget's verdicts: ``best_at_budget`` (lowest Japanese bits per character),
    ``on_pareto_front`` and ``recommendation`` (the same object on every row of a budget); and to every row of an
    extended arm measured at three budgets or more, its ``crossing`` (``crossings``: the same object at each
    budget)."""
    for group in by_budget(rows).values():
        best = min(group, key=lambda r: r["ja_bpc"])["name"]
        front, rec = set(pareto_front(group)), recommendation(group)
        for r in group:
            r.update(best_at_budget=r["name"] == best, on_pareto_front=r["name"] in front, recommendation=rec)
    cross = crossings(rows)
    for r in rows:
        if r["name"] in cross:
            r["crossing"] = cross[r["name"]]


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------
def format_table(rows: Sequence[dict]) -> str:
    """The comparison as a Markdown table (bits per character: lower is better; Δ against the base arm)."""
    base = next((r for r in rows if r["name"] == "base"), None)

    def delta(r: dict, key: str) -> str:
        return f" ({r[key] - base[key]:+.3f})" if base is not None and r is not base else ""

    lines = ["| arm | tokens | FLOPs | ja bits/char step 0 → end | en bits/char step 0 → end | ja chars/token "
             "| gen chars/s |", "|---|---:|---:|---|---|---:|---:|"]
    for r in rows:
        cps = "" if r.get("chars_per_second") is None else f"{r['chars_per_second']:.1f}"
        lines.append(f"| {r['name']} | {r['tokens']:,} | {r['flops']:.3g} | {r['ja_bpc_step0']:.3f} → "
                     f"{r['ja_bpc']:.3f}{delta(r, 'ja_bpc')} | {r['en_bpc_step0']:.3f} → {r['en_bpc']:.3f}"
                     f"{delta(r, 'en_bpc')} | {r['ja_chars_per_token']:.3f} | {cps} |")
    return "\n".join(lines)


def _markdown(rows: Sequence[dict], texts: Mapping[str, list[str]]) -> str:
    held = ", ".join(f"{lang} {len(d)} documents / {sum(map(len, d)):,} characters" for lang, d in texts.items())
    out = ["# xlt compare", "", f"Held-out text: {held}.",
           "Bits per character: lower is better; in brackets the difference to the base arm.", ""]
    for budget, group in by_budget(rows).items():
        spread = flops_spread([r["flops"] for r in group])
        partial = ", ".join(f"{r['name']} {r['partial_training']['flops_per_token'] / (6 * r['n_eff']):.3f}"
                            for r in group if r.get("partial_training"))
        how = f" (partial-training phases per token: {partial} of 6 · N_eff)" if partial else ""
        out += [f"## Budget {budget:.4g} training FLOPs per arm", "",
                f"6 · N_eff · tokens + init{how}; the arms' FLOPs differ by {spread:.2%}.", "", format_table(group), ""]
        if "recommendation" in group[0]:
            best = next(r["name"] for r in group if r["best_at_budget"])
            front = ", ".join(r["name"] for r in group if r["on_pareto_front"])
            out += [f"- lowest Japanese bits/char: **{best}**",
                    f"- Pareto front (Japanese bits/char, Japanese chars/token): {front}",
                    f"- recommendation: {group[0]['recommendation']['text']}", ""]
    out += _crossing_section(rows)
    seen = set()
    for r in rows:
        if r["name"] in seen:
            continue
        seen.add(r["name"])
        if r["overrides"]:
            out.append(f"- **{r['name']}**: " + ", ".join(f"`{k}: {v}`" for k, v in r["overrides"].items()))
    out += ["", "![bits per character against compute](compare.png)", ""]
    return "\n".join(out)


def _crossing_section(rows: Sequence[dict]) -> list[str]:
    """compare.md's extrapolation: each extended arm's gap to the base arm per budget and where its line meets 0."""
    cross = {r["name"]: r["crossing"] for r in rows if r.get("crossing")}
    if not cross:
        return []
    groups = by_budget(rows)
    gap = {(b, r["name"]): r["ja_bpc"] - base["ja_bpc"] for b, g in groups.items()
           for base in [next((x for x in g if x["name"] == "base"), None)] if base is not None for r in g}
    out = ["## Where the curves would cross", "",
           "Japanese bits/char of each extended arm minus the original tokenizer's at each budget, and the straight "
           "line through them in log2 FLOPs extrapolated to zero (a trend, not a measurement: the residual says how "
           "well a line fits).", "",
           "| arm | new tokens | " + " | ".join(f"Δ @ {b:.3g}" for b in groups) +
           " | Δ per doubling | max residual | crossing FLOPs | ≈ base-arm tokens |",
           "|---|---:|" + "---:|" * (len(groups) + 4)]
    for name, c in cross.items():
        cells = [f"{gap[(b, name)]:+.3f}" if (b, name) in gap else "" for b in groups]
        flops = "never (not shrinking)" if c["crossing_flops"] is None else f"{c['crossing_flops']:.3g}"
        toks = "" if c["crossing_base_tokens"] is None else f"{c['crossing_base_tokens']:,}"
        out.append(f"| {name} | {c['new_tokens']} | " + " | ".join(cells) +
                   f" | {c['gap_per_doubling']:+.3f} | {c['max_residual']:.3f} | {flops} | {toks} |")
    return out + [""]


def plot(rows: Sequence[dict], path: str) -> None:
    """``path``: Japanese and English bits per character against training FLOPs, one line per arm (and budget);
    with arms of several new-token counts, a third panel: Japanese bits per character minus the base arm's against
    the new tokens, one line per budget."""
    from xlt.report import new_figure, save_figure

    counts = sorted({r.get("new_tokens", 0) for r in rows})
    cross = {r["name"]: r["crossing"] for r in rows if r.get("crossing")}
    panels = (3 if len(counts) > 1 else 2) + bool(cross)
    several = len({r["budget_flops"] for r in rows}) > 1
    fig = new_figure(5.0 * panels, 3.8)
    for i, lang in enumerate(LANGS):
        ax = fig.add_subplot(1, panels, i + 1)
        for r in rows:
            pts = [(p["flops"], p[f"{lang}_bpc"]) for p in r["curve"]]
            label = f"{r['name']} @ {r['budget_flops']:.2g}" if several else r["name"]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xlabel("training FLOPs (6·N_eff·tokens + init)")
        ax.set_ylabel(f"{lang} bits per character")
        ax.set_title(f"held-out {lang}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if len(counts) > 1:
        ax = fig.add_subplot(1, panels, 3)
        for budget, group in by_budget(rows).items():
            base = next((r for r in group if r["name"] == "base"), None)
            if base is None:
                continue
            pts = sorted((r.get("new_tokens", 0), r["ja_bpc"] - base["ja_bpc"]) for r in group)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{budget:.2g} FLOPs")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xscale("symlog", linthresh=16)
        ax.set_xlabel("new tokens")
        ax.set_ylabel("Δ ja bits per character vs the original tokenizer")
        ax.set_title("does the extension pay?")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if cross:
        _plot_crossings(fig.add_subplot(1, panels, panels), rows, cross)
    save_figure(fig, path)


def _plot_crossings(ax: Any, rows: Sequence[dict], cross: Mapping[str, dict]) -> None:
    """The gap to the base arm against FLOPs per extended arm, and its fitted line up to where it meets zero
    (drawn at most to 10^4 x the largest budget)."""
    budgets = sorted({r["budget_flops"] for r in rows})
    for name, c in cross.items():
        pts = sorted((r["budget_flops"], r["ja_bpc"] - base["ja_bpc"]) for r in rows if r["name"] == name
                     for base in rows if base["name"] == "base" and base["budget_flops"] == r["budget_flops"])
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="", label=name)[0]
        end = min(c["crossing_flops"] or math.inf, budgets[-1] * 1e4)
        xs = [budgets[0] * (end / budgets[0]) ** (i / 32) for i in range(33)]
        slope = c["gap_per_doubling"]
        at = sum(y - slope * math.log2(x) for x, y in pts) / len(pts)  # the least-squares line's intercept
        ax.plot(xs, [at + slope * math.log2(x) for x in xs], ls="--", color=line.get_color())
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs per arm")
    ax.set_ylabel("Δ ja bits/char vs the original")
    ax.set_title("where would the curves cross? (fit, extrapolated)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def write_outputs(output_dir: str, rows: list[dict], texts: Mapping[str, list[str]]) -> None:
    from xlt.io import atomic_write_text

    atomic_write_json(os.path.join(output_dir, "compare.json"), rows)
    atomic_write_text(os.path.join(output_dir, "compare.md"), _markdown(rows, texts))
    plot(rows, os.path.join(output_dir, "compare.png"))


def main(config: str, output_dir: Optional[str] = None, as_json: bool = False) -> int:
    """``xlt compare``: run the comparison, then print the table (``--json``: only the JSON list on stdout; the
    progress of the runs goes to stderr)."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        rows, out = run_compare(config, output_dir)
    if as_json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        print(format_table(rows))
        print(f"\ncompare: {os.path.join(out, 'compare.json')}, compare.md, compare.png")
    return 0
