"""Japanese MT-Bench: FastChat ``llm_judge`` single-answer grading, reimplemented (not vendored).

The files are FastChat's layouts (``fastchat/llm_judge/data/japanese_mt_bench/``):

* questions ``{"question_id": int, "category": str, "turns": [str, str]}``;
* judge prompts ``{"name", "type", "system_prompt", "prompt_template", "output_format", ...}``;
* answers and reference answers ``{"question_id", "model_id", "choices": [{"index": 0, "turns": [str, str]}]}``;
* judgments ``{"question_id", "model", "judge": [judge, prompt name], "user_prompt", "judgment", "score",
  "turn"}``.

What FastChat does and this module repeats: a question in ``math`` / ``reasoning`` / ``coding`` is judged with
``single-math-v1`` (GPT-4's reference answer in the prompt), any other with ``single-v1``; turn 2 uses the
``-multi-turn`` form of the same prompt, which shows both turns. The prompt is the template's ``str.format``
with the question, answer and reference turns; the judge sees ``[system, user]`` messages; the rating is the
first ``[[x]]`` in the verdict, else the first ``[x]``, else -1; results are means over scores other than -1
(``show_result``: per turn and over both turns; per category over both turns, as FastChat's radar plot).
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from xlt.config import XltError

#: Categories whose questions are judged against the reference answer (FastChat ``NEED_REF_CATS``).
NEED_REF_CATS = ("math", "reasoning", "coding")
#: Sampling temperature per category for answer generation (FastChat ``temperature_config``); 0 is greedy.
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
               "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7  # FastChat's value for a category outside the table
#: The single-answer judge prompts FastChat's ``make_judge_single`` uses: (reference-based?, turn) -> name.
SINGLE_PROMPTS = {(False, 1): "single-v1", (True, 1): "single-math-v1",
                  (False, 2): "single-v1-multi-turn", (True, 2): "single-math-v1-multi-turn"}
# FastChat's one_score_pattern and its backup.
_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


# ---------------------------------------------------------------------------------------------
# Reading FastChat's files (every layout error is one line naming the file and line)
# ---------------------------------------------------------------------------------------------
def _rows(path: str, what: str) -> Iterable[tuple[str, dict]]:
    """``(where, row)`` for each non-blank line of a jsonl file; ``where`` is ``path:line`` for messages."""
    if not os.path.isfile(path):
        raise XltError(f"{what}: file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{what}: {path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise XltError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise XltError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _field(where: str, row: dict, key: str, kind: type | tuple[type, ...], layout: str) -> Any:
    value = row.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise XltError(f"{where}: {key!r} missing or not {_kind_name(kind)} (FastChat {layout} layout: {layout_hint(layout)})")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"int": "an integer", "str": "a string", "list": "a list", "float": "a number"}
                       .get(k.__name__, k.__name__) for k in kinds)


_LAYOUTS = {
    "question": '{"question_id": int, "category": str, "turns": [str, ...]}',
    "answer": '{"question_id": int, "model_id": str, "choices": [{"turns": [str, ...]}]}',
    "judge prompt": '{"name", "type", "system_prompt", "prompt_template", "output_format"}',
    "judgment": '{"question_id": int, "model": str, "judge": [str, str], "score": number, "turn": 1|2}',
}


def layout_hint(layout: str) -> str:
    return _LAYOUTS[layout]


def _turns(where: str, turns: Any, layout: str) -> list[str]:
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        raise XltError(f"{where}: 'turns' must be a non-empty list of strings (FastChat {layout} layout: "
                       f"{layout_hint(layout)})")
    return turns


def load_questions(path: str) -> list[dict]:
    """Questions in file order; a duplicate ``question_id`` is an error."""
    out, seen = [], set()
    for where, row in _rows(path, "questions"):
        qid = _field(where, row, "question_id", int, "question")
        category = _field(where, row, "category", str, "question")
        turns = _turns(where, row.get("turns"), "question")
        if qid in seen:
            raise XltError(f"{where}: question_id {qid} appears twice")
        seen.add(qid)
        out.append({"question_id": qid, "category": category, "turns": turns})
    if not out:
        raise XltError(f"questions: {path} holds no questions")
    return out


def load_answers(path: str, what: str = "answers") -> dict[int, dict]:
    """Answers (or reference answers) by ``question_id``; a later line for the same id replaces an earlier one."""
    out: dict[int, dict] = {}
    for where, row in _rows(path, what):
        qid = _field(where, row, "question_id", int, "answer")
        choices = _field(where, row, "choices", list, "answer")
        if not choices or not isinstance(choices[0], dict):
            raise XltError(f"{where}: 'choices' must hold at least one object with 'turns' "
                           f"(FastChat answer layout: {layout_hint('answer')})")
        _turns(where, choices[0].get("turns"), "answer")
        out[qid] = row
    return out


def load_judge_prompts(path: str) -> dict[str, dict]:
    """Judge prompts by name; the four single-answer prompts must be present."""
    out = {}
    for where, row in _rows(path, "judge prompts"):
        for key in ("name", "type", "system_prompt", "prompt_template", "output_format"):
            _field(where, row, key, str, "judge prompt")
        out[row["name"]] = row
    missing = [n for n in SINGLE_PROMPTS.values() if n not in out]
    if missing:
        raise XltError(f"judge prompts: {path} lacks {', '.join(missing)} (FastChat's judge_prompts.jsonl)")
    for name in SINGLE_PROMPTS.values():
        if out[name]["output_format"] != "[[rating]]":
            raise XltError(f"judge prompts: {path}: {name} has output_format {out[name]['output_format']!r}; "
                           "single-answer grading reads a '[[rating]]'")
    return out


def load_judgments(path: str) -> list[dict]:
    """Judgment rows in FastChat's ``model_judgment`` layout, in file order."""
    out = []
    for where, row in _rows(path, "judgments"):
        _field(where, row, "question_id", int, "judgment")
        _field(where, row, "model", str, "judgment")
        _field(where, row, "score", (int, float), "judgment")
        judge = row.get("judge")
        if not (isinstance(judge, list) and len(judge) == 2 and all(isinstance(j, str) for j in judge)):
            raise XltError(f"{where}: 'judge' must be [judge model, prompt name] "
                           f"(FastChat judgment layout: {layout_hint('judgment')})")
        if row.get("turn") not in (1, 2):
            raise XltError(f"{where}: 'turn' must be 1 or 2 (got {row.get('turn')!r})")
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Judge prompts and verdicts
# ---------------------------------------------------------------------------------------------
def needs_reference(category: str) -> bool:
    return category in NEED_REF_CATS


def prompt_for(prompts: dict[str, dict], category: str, turn: int) -> dict:
    """The judge prompt FastChat uses for a question of ``category`` at ``turn`` (1 or 2)."""
    return prompts[SINGLE_PROMPTS[(needs_reference(category), turn)]]


def judge_user_prompt(prompt: dict, question: dict, answer: dict, reference: Optional[dict], turn: int) -> str:
    """The user message of the judge, exactly as FastChat's ``run_judge_single`` formats it."""
    kwargs = {}
    if reference is not None:
        ref = reference["choices"][0]["turns"]
        kwargs["ref_answer_1"] = ref[0]
        if turn == 2:
            kwargs["ref_answer_2"] = ref[1]
    ans = answer["choices"][0]["turns"]
    if turn == 2:
        return prompt["prompt_template"].format(question_1=question["turns"][0], question_2=question["turns"][1],
                                                answer_1=ans[0], answer_2=ans[1], **kwargs)
    return prompt["prompt_template"].format(question=question["turns"][0], answer=ans[0], **kwargs)


def judge_messages(prompt: dict, user_prompt: str) -> list[dict]:
    """What the judge model is sent: FastChat sets the prompt's system message, then the user prompt."""
    return [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user_prompt}]


def parse_rating(judgment: str, output_format: str = "[[rating]]") -> int | float:
    """The rating in a verdict: the first ``[[x]]``, else the first ``[x]``; -1 when there is none."""
    if output_format != "[[rating]]":
        raise XltError(f"judge prompt: output_format {output_format!r} is not a single-answer rating")
    match = _SCORE.search(judgment) or _SCORE_BACKUP.search(judgment)
    return ast.literal_eval(match.group(1)) if match else -1


def _answer_turns(answer: dict) -> int:
    return len(answer["choices"][0]["turns"])


def matches(questions: Sequence[dict], answers: dict[int, dict], references: Optional[dict[int, dict]],
            prompts: dict[str, dict], answers_path: str = "answers") -> list[dict]:
    """Every (question, turn) to judge with its prompt name and messages; checked before any judging.

    As FastChat's ``make_match_single``: turn 2 only for two-turn questions; a reference-based question needs
    its reference answer. A missing answer or reference is one line naming the question.
    """
    out = []
    for q in questions:
        qid = q["question_id"]
        answer = answers.get(qid)
        if answer is None:
            raise XltError(f"answers: {answers_path} has no answer to question {qid}")
        reference = None
        if needs_reference(q["category"]):
            reference = (references or {}).get(qid)
            if reference is None:
                raise XltError(f"references: no reference answer to question {qid} ({q['category']} is judged "
                               "against GPT-4's reference)")
        for turn in (1, 2) if len(q["turns"]) == 2 else (1,):
            if _answer_turns(answer) < turn or (reference is not None and _answer_turns(reference) < turn):
                raise XltError(f"answers: the answer or reference to question {qid} has no turn {turn}")
            prompt = prompt_for(prompts, q["category"], turn)
            user = judge_user_prompt(prompt, q, answer, reference, turn)
            out.append({"question_id": qid, "category": q["category"], "turn": turn, "prompt": prompt["name"],
                        "output_format": prompt["output_format"], "user_prompt": user,
                        "messages": judge_messages(prompt, user)})
    return out


# ---------------------------------------------------------------------------------------------
# Results (FastChat show_result)
# ---------------------------------------------------------------------------------------------
def _mean(scores: list[float]) -> Optional[float]:
    return sum(scores) / len(scores) if scores else None


def aggregate(judgments: Sequence[dict], categories: dict[int, str]) -> dict:
    """``{"score", "turn1", "turn2", "categories", "n", "unparsed"}`` over ``judgments``.

    Means over scores other than -1 (``show_result``): ``score`` over every turn, ``turn1`` / ``turn2`` per
    turn, ``categories`` per question category over both turns (``categories`` maps question id -> category).
    ``n`` counts judgments, ``unparsed`` those with score -1 (no rating in the verdict).
    """
    scored = [j for j in judgments if j["score"] != -1]
    per_cat: dict[str, list[float]] = {}
    for j in scored:
        per_cat.setdefault(categories.get(j["question_id"], "unknown"), []).append(j["score"])
    return {"score": _mean([j["score"] for j in scored]),
            "turn1": _mean([j["score"] for j in scored if j["turn"] == 1]),
            "turn2": _mean([j["score"] for j in scored if j["turn"] == 2]),
            "categories": {c: _mean(s) for c, s in sorted(per_cat.items())},
            "n": len(judgments), "unparsed": len(judgments) - len(scored)}
