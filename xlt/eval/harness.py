"""lm-eval (EleutherAI lm-evaluation-harness) on local files: its ``japanese_leaderboard`` tasks offline.

lm-eval's tasks name Hub datasets (``Rakuten/JGLUE``), which an offline machine cannot fetch. This
module writes, into a temporary folder, task configs with the same prompt, choices, target and metric
as lm-eval's ``ja_leaderboard_*`` tasks but ``dataset_path: json`` and ``data_files`` pointing at local
files, then runs ``lm_eval.simple_evaluate`` on them with only that folder indexed (no scan of
lm-eval's thousands of built-in tasks). Requires the ``eval`` extra: ``pip install 'xlt[eval]'``.

Local files, in ``--data-dir`` (JCommonsenseQA layout: question, choice0..choice4, label):
``jcommonsenseqa_valid.jsonl`` (evaluated) and optionally ``jcommonsenseqa_train.jsonl`` (few-shot
examples; without it the task runs zero-shot).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

import yaml

from xlt.config import XltError

# Same prompt as lm-eval 0.4.x tasks/japanese_leaderboard/ja_leaderboard_jcommonsenseqa.yaml; the
# choices are built in Jinja instead of its process_docs function so that the config is one file.
_CHOICES = "[choice0, choice1, choice2, choice3, choice4]"
TASKS: dict[str, dict[str, Any]] = {
    "jcommonsenseqa": {
        "files": {"validation": "jcommonsenseqa_valid.jsonl", "train": "jcommonsenseqa_train.jsonl"},
        "config": {
            "task": "xlt_ja_leaderboard_jcommonsenseqa",
            "output_type": "multiple_choice",
            "description": "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n\n",
            "doc_to_text": "### 指示：\n出力は以下から選択してください：\n{% for choice in " + _CHOICES +
                           " %}- {{ choice }}\n{% endfor %}\n### 入力：\n{{ question }}\n\n### 応答：",
            "doc_to_target": "label",
            "doc_to_choice": "{{" + _CHOICES + "}}",
            "target_delimiter": "\n",
            "num_fewshot": 3,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        },
    },
}


def task_config(task: str, data_dir: str) -> dict[str, Any]:
    """The lm-eval task config of ``task`` reading its local files in ``data_dir``.

    Raises a one-line ``XltError`` for an unknown task or a missing evaluation file. Few-shot
    examples come from the train file when it exists; otherwise the task is zero-shot.
    """
    if task not in TASKS:
        raise XltError(f"--tasks: unknown task {task!r} (known: {', '.join(sorted(TASKS))})")
    spec = TASKS[task]
    valid = os.path.abspath(os.path.join(data_dir, spec["files"]["validation"]))
    if not os.path.isfile(valid):
        raise XltError(f"--data-dir: {valid} not found (task {task})")
    cfg = dict(spec["config"])
    data_files = {"validation": valid}
    train = os.path.abspath(os.path.join(data_dir, spec["files"]["train"]))
    if os.path.isfile(train):
        data_files["train"] = train
        cfg.update(training_split="train", fewshot_split="train")
    else:
        cfg["num_fewshot"] = 0
    cfg.update(dataset_path="json", dataset_kwargs={"data_files": data_files}, validation_split="validation",
               test_split=None)
    return cfg


def write_task_configs(tasks: list[str], data_dir: str, folder: str) -> dict[str, str]:
    """Write one YAML per task into ``folder``; returns ``{task: lm-eval task name}``."""
    names = {}
    for task in tasks:
        cfg = task_config(task, data_dir)
        with open(os.path.join(folder, f"{cfg['task']}.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg, f, allow_unicode=True, sort_keys=False)
        names[task] = cfg["task"]
    return names


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def run_harness(model_dir: str, tasks: list[str], data_dir: str, limit: Optional[int] = None, batch_size: int = 8,
                num_fewshot: Optional[int] = None, device: Optional[str] = None) -> dict:
    """Run lm-eval on local copies of its Japanese tasks: ``{"results": {task: {metric: value}}, "n": {...}}``.

    Every check (lm-eval present, task known, files present, model directory) happens before the
    model loads.
    """
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise XltError("--tasks: no task given")
    for task in tasks:
        task_config(task, data_dir)
    if not os.path.isdir(model_dir):
        raise XltError(f"--model: {model_dir} is not a model directory")
    if not lm_eval_available():
        raise XltError("lm-eval is not installed: pip install 'xlt[eval]'")
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="xlt-lm-eval-") as folder:
        names = write_task_configs(tasks, data_dir, folder)
        manager = TaskManager(include_path=folder, include_defaults=False)
        out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": model_dir, "dtype": "auto"},
                                      tasks=list(names.values()), num_fewshot=num_fewshot, batch_size=batch_size,
                                      device=device, limit=limit, task_manager=manager, log_samples=False,
                                      bootstrap_iters=0)
    results, n = {}, {}
    for task, name in names.items():
        raw = out["results"][name]
        results[task] = {k.split(",")[0]: float(v) for k, v in raw.items()
                         if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
        n[task] = int(out.get("n-samples", {}).get(name, {}).get("effective", 0))
    return {"results": results, "n": n}
