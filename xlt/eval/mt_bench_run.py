"""``xlt evaluate mt-bench``: answer the questions (both turns), judge each turn, average as FastChat.

Files under ``--output DIR`` (FastChat's layouts, appended one line at a time so a stopped run resumes):
``model_answer/MODEL.jsonl``, ``model_judgment/JUDGE_single.jsonl`` and ``result.json``.
"""

from __future__ import annotations

import gc
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any, Optional

from xlt.config import XltError
from xlt.eval import mt_bench as mtb
from xlt.log import logger

DEFAULT_QUESTIONS = "../shared/data/japanese_mt_bench/question.jsonl"
DEFAULT_OUTPUT = "runs/mt_bench"
ANSWER_MAX_NEW_TOKENS = 1024  # FastChat gen_model_answer --max-new-token
JUDGE_MAX_TOKENS = 2048  # FastChat's judge setting (temperature 0)
_ID_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"  # shortuuid's, as FastChat's answer_id


@dataclass
class MtBenchOptions:
    model: Optional[str] = None
    questions: str = DEFAULT_QUESTIONS
    judge_prompts: Optional[str] = None
    references: Optional[str] = None
    categories: Optional[str] = None
    max_questions: Optional[int] = None
    judge: Optional[str] = None
    judge_url: Optional[str] = None
    judge_model: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    answers: Optional[str] = None
    output: str = DEFAULT_OUTPUT
    model_id: Optional[str] = None
    max_new_tokens: int = ANSWER_MAX_NEW_TOKENS
    judge_max_tokens: int = JUDGE_MAX_TOKENS
    verdict_retries: int = 2
    trust_remote_code: bool = False
    replace_stale: bool = False  # the evaluate stage: answers of an earlier model are set aside, not an error
    backend: str = "auto"  # answer generation: transformers, vllm, or auto (vllm when installed on a GPU)


_log = logger("mt-bench", stderr=True)  # stdout carries --json


def _file_name(name: str) -> str:
    """A model or judge name as one file name (``org/name`` -> ``org--name``)."""
    return name.replace(os.sep, "--").replace("/", "--")


def _append(path: str, row: dict) -> None:
    """One FastChat line (``json.dumps`` defaults, as FastChat writes), flushed before the next work starts."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------
# Inputs, all checked before a model loads
# ---------------------------------------------------------------------------------------------
def check_numbers(o: MtBenchOptions) -> None:
    for flag, value, low in (("--max-questions", o.max_questions, 1), ("--max-new-tokens", o.max_new_tokens, 1),
                             ("--judge-max-tokens", o.judge_max_tokens, 1), ("--verdict-retries", o.verdict_retries, 0)):
        if value is not None and value < low:
            raise XltError(f"mt-bench: {flag}={value} must be at least {low}")


def check_judge(o: MtBenchOptions) -> None:
    if o.judge and (o.judge_url or o.judge_model):
        raise XltError("mt-bench: give --judge MODEL_SPEC or --judge-url URL --judge-model NAME, not both")
    if bool(o.judge_url) != bool(o.judge_model):
        raise XltError("mt-bench: --judge-url and --judge-model go together")
    if not (o.judge or o.judge_url):
        raise XltError("mt-bench: no judge: give --judge MODEL_SPEC (a local model) or --judge-url URL "
                       "--judge-model NAME (an OpenAI-compatible endpoint)")
    if bool(o.model) == bool(o.answers):
        raise XltError("mt-bench: give --model DIR (its answers are generated) or --answers FILE (graded as they "
                       "are), one of the two")


def select_questions(questions: list[dict], categories: Optional[str], max_questions: Optional[int]) -> list[dict]:
    """The questions of ``categories`` (comma-separated), the first ``max_questions`` of them."""
    if categories:
        wanted = [c.strip() for c in categories.split(",") if c.strip()]
        known = sorted({q["category"] for q in questions})
        unknown = [c for c in wanted if c not in known]
        if unknown:
            raise XltError(f"mt-bench: --categories {','.join(unknown)}: not in the question file "
                           f"(it has {', '.join(known)})")
        questions = [q for q in questions if q["category"] in wanted]
    return questions[:max_questions] if max_questions else questions


def _sibling(questions_path: str, names: tuple[str, ...]) -> Optional[str]:
    folder = os.path.dirname(os.path.abspath(questions_path))
    return next((p for n in names if os.path.isfile(p := os.path.normpath(os.path.join(folder, n)))), None)


def load_inputs(o: MtBenchOptions) -> tuple[list[dict], dict, Optional[dict]]:
    """Questions (selected), judge prompts and reference answers; the latter two default to FastChat's places
    next to the question file (or the copies of the shared data folder)."""
    from xlt.io import resolve_shared

    qpath = resolve_shared(o.questions)
    questions = select_questions(mtb.load_questions(qpath), o.categories, o.max_questions)
    ppath = o.judge_prompts or _sibling(qpath, ("judge_prompts.jsonl", "../judge_prompts.jsonl"))
    if not ppath:
        raise XltError(f"mt-bench: no judge_prompts.jsonl next to {qpath}; give --judge-prompts FILE")
    prompts = mtb.load_judge_prompts(ppath)
    references = None
    if any(mtb.needs_reference(q["category"]) for q in questions):
        rpath = o.references or _sibling(qpath, ("reference_answer_gpt-4.jsonl", "reference_answer/gpt-4.jsonl"))
        if not rpath:
            raise XltError(f"mt-bench: math / reasoning / coding are judged against reference answers; none next "
                           f"to {qpath} (reference_answer/gpt-4.jsonl); give --references FILE")
        references = mtb.load_answers(rpath, "references")
        check_references(questions, references, rpath)
    return questions, prompts, references


def check_references(questions: list[dict], references: dict, path: str) -> None:
    for q in questions:
        ref = references.get(q["question_id"])
        if mtb.needs_reference(q["category"]) and (ref is None or
                                                   len(ref["choices"][0]["turns"]) < len(q["turns"])):
            raise XltError(f"references: {path} has no {len(q['turns'])}-turn answer to question {q['question_id']}")


def answers_model_id(answers: dict, path: str) -> str:
    ids = {a.get("model_id") for a in answers.values()}
    if len(ids) != 1 or not isinstance(next(iter(ids)), str):
        raise XltError(f"answers: {path} must hold one model's answers (model_id: {sorted(map(str, ids))})")
    return next(iter(ids))


# ---------------------------------------------------------------------------------------------
# Answers (FastChat gen_model_answer)
# ---------------------------------------------------------------------------------------------
def answer_question(chat: Any, question: dict, max_new_tokens: int) -> list[str]:
    """Both turns in the model's own format at the category's temperature; turn 2 sees turn 1's answer."""
    temperature = mtb.TEMPERATURE.get(question["category"], mtb.DEFAULT_TEMPERATURE)
    messages, turns = [], []
    chat.new_conversation()
    for text in question["turns"]:
        messages.append({"role": "user", "content": text})
        answer = chat.complete(messages, temperature, max_new_tokens)
        messages.append({"role": "assistant", "content": answer})
        turns.append(answer)
    return turns


def generate_answers(chat: Any, questions: list[dict], path: str, model_id: str, max_new_tokens: int) -> dict:
    """Answers by question id; questions already answered in ``path`` (same model) are not regenerated."""
    done = mtb.load_answers(path) if os.path.isfile(path) else {}
    if done and answers_model_id(done, path) != model_id:
        raise XltError(f"answers: {path} holds another model's answers ({answers_model_id(done, path)})")
    for q in questions:
        if q["question_id"] in done:
            continue
        t0 = time.perf_counter()
        turns = answer_question(chat, q, max_new_tokens)
        row = {"question_id": q["question_id"], "answer_id": "".join(secrets.choice(_ID_ALPHABET) for _ in range(22)),
               "model_id": model_id, "choices": [{"index": 0, "turns": turns}], "tstamp": time.time()}
        _append(path, row)
        done[q["question_id"]] = row
        _log(f"answered question {q['question_id']} ({q['category']}) in {time.perf_counter() - t0:.1f}s")
    return done


# ---------------------------------------------------------------------------------------------
# Judging (FastChat gen_judgment --mode single)
# ---------------------------------------------------------------------------------------------
def judge_one(judge: Any, match: dict, max_tokens: int, retries: int) -> tuple[str, Any, int]:
    """``(verdict, score, attempts)``: the verdict is asked again up to ``retries`` times while it has no rating."""
    attempts = 0
    while True:
        attempts += 1
        verdict = judge.complete(match["messages"], 0.0, max_tokens)
        score = mtb.parse_rating(verdict, match["output_format"])
        if score != -1 or attempts > retries:
            return verdict, score, attempts


def _judgment_key(j: dict) -> tuple:
    return j["question_id"], j["turn"], j["model"], tuple(j["judge"])


def judge_all(judge: Any, todo: list[dict], path: str, model_id: str, max_tokens: int,
              retries: int) -> tuple[list, float, int]:
    """FastChat judgment rows for ``todo``, the seconds spent judging and the number of new judgments.

    A judgment already in ``path`` (same question, turn, model, judge, prompt name and prompt text) is reused;
    new ones are appended, so a later line for the same match supersedes an earlier one."""
    done = {_judgment_key(j): j for j in mtb.load_judgments(path)} if os.path.isfile(path) else {}
    retries = 0 if judge.deterministic else retries
    rows, spent, new = [], 0.0, 0
    for m in todo:
        row = done.get((m["question_id"], m["turn"], model_id, (judge.name, m["prompt"])))
        if row is None or row.get("user_prompt") != m["user_prompt"]:  # not judged, or judged on other answers
            t0 = time.perf_counter()
            verdict, score, attempts = judge_one(judge, m, max_tokens, retries)
            spent, new = spent + time.perf_counter() - t0, new + 1
            row = {"question_id": m["question_id"], "model": model_id, "judge": [judge.name, m["prompt"]],
                   "user_prompt": m["user_prompt"], "judgment": verdict, "score": score, "turn": m["turn"],
                   "tstamp": time.time()}
            _append(path, row)
            _log(f"question {m['question_id']} turn {m['turn']}: "
                 + (f"score {score}" if score != -1 else "no rating in the verdict (counted as unparsed)")
                 + (f" after {attempts} attempts" if attempts > 1 else ""))
        rows.append(row)
    return rows, spent, new


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def make_judge(o: MtBenchOptions) -> Any:
    from xlt.eval.mt_bench_models import EndpointChat, LocalChat

    if o.judge_url:
        judge = EndpointChat(o.judge_url, o.judge_model, api_key_env=o.api_key_env)
        judge.check_reachable()
        return judge
    return LocalChat(o.judge, trust_remote_code=o.trust_remote_code)


def _answers(o: MtBenchOptions, questions: list[dict]) -> tuple[dict, str, str, float]:
    """``(answers, model_id, answers path, seconds generating)``: read from ``--answers`` or generated."""
    from xlt.eval.mt_bench_models import answering_chat, model_name, pick_backend

    if o.answers:
        answers = mtb.load_answers(o.answers)
        return answers, o.model_id or answers_model_id(answers, o.answers), o.answers, 0.0
    model_id = o.model_id or model_name(o.model)
    path = os.path.join(o.output, "model_answer", f"{_file_name(model_id)}.jsonl")
    check_stale_answers(path, o.model, o.replace_stale)
    t0 = time.perf_counter()
    backend = pick_backend(o.backend)
    _log(f"answers of {o.model} on {backend} (questions already in {path} are kept)")
    chat = answering_chat(o.model, backend, trust_remote_code=o.trust_remote_code)
    answers = generate_answers(chat, questions, path, model_id, o.max_new_tokens)
    del chat
    gc.collect()
    _free_gpu()
    return answers, model_id, path, time.perf_counter() - t0


def _free_gpu() -> None:
    """The answering model's GPU memory back before the judge loads (vLLM reserves most of the GPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _newest_file(folder: str) -> float:
    return max((e.stat().st_mtime for e in os.scandir(folder) if e.is_file()), default=0.0)


def check_stale_answers(path: str, model: str, replace: bool) -> None:
    """Answers older than the model folder's newest file were written by an earlier model (retrained in
    place): they are set aside as ``PATH.stale`` when ``replace`` (the evaluate stage), else one line."""
    folder = os.path.expanduser(model)
    if not (os.path.isfile(path) and os.path.isdir(folder)) or os.path.getmtime(path) >= _newest_file(folder):
        return
    if not replace:
        raise XltError(f"answers: {path} is older than the model in {model} (retrained?); delete it or give "
                       "another --output")
    os.replace(path, path + ".stale")
    _log(f"{path} predates {model}: set aside as {path}.stale, answering again")


def check_early(o: MtBenchOptions) -> None:
    """Options, models and the endpoint's reachability: before answers are generated."""
    from xlt.models import check_model_spec

    check_numbers(o)
    check_judge(o)
    if o.model:
        from xlt.eval.mt_bench_models import pick_backend

        pick_backend(o.backend)
        check_model_spec(o.model)
    if o.judge:
        check_model_spec(o.judge)
    if o.judge_url:
        from xlt.eval.mt_bench_models import EndpointChat

        EndpointChat(o.judge_url, o.judge_model, api_key_env=o.api_key_env).check_reachable()


def run_mt_bench(o: MtBenchOptions) -> dict:
    """Answers, judgments and ``{"score", "turn1", "turn2", "categories", "n", "unparsed"}`` (also in
    ``OUTPUT/result.json`` with the files used and the time spent)."""
    check_early(o)
    questions, prompts, references = load_inputs(o)
    if o.answers:  # every judge prompt can be built before a model loads
        mtb.matches(questions, mtb.load_answers(o.answers), references, prompts, o.answers)
    answers, model_id, answers_path, answer_s = _answers(o, questions)
    todo = mtb.matches(questions, answers, references, prompts, answers_path)
    judge = make_judge(o)
    jpath = os.path.join(o.output, "model_judgment", f"{_file_name(judge.name)}_single.jsonl")
    rows, judge_s, judged = judge_all(judge, todo, jpath, model_id, o.judge_max_tokens, o.verdict_retries)
    result = mtb.aggregate(rows, {q["question_id"]: q["category"] for q in questions})
    from xlt.io import atomic_write_json

    atomic_write_json(os.path.join(o.output, "result.json"),
                      {**result, "model": model_id, "judge": judge.name, "answers": answers_path,
                       "judgments": jpath, "seconds_answering": round(answer_s, 2),
                       "seconds_judging": round(judge_s, 2), "new_judgments": judged,
                       "seconds_per_judgment": round(judge_s / judged, 3) if judged else None})
    return result


# ---------------------------------------------------------------------------------------------
# The evaluate stage (make evaluate MT_BENCH=1): the run's SFT model, into report.json "mt_bench"
# ---------------------------------------------------------------------------------------------
def stage_options(args: Any) -> Optional[MtBenchOptions]:
    """MT-Bench options of an evaluate recipe (``mt_bench: true``), checked before any model loads; None when off.

    The SFT model answers; ``mt_bench_judge`` is a judge model spec, or an ``http(s)://`` endpoint whose
    served model is ``mt_bench_judge_model``. Files go to ``RUN/mt_bench/``.
    """
    if not getattr(args, "mt_bench", False):
        return None
    sft = os.path.join(args.output_dir, "sft")
    if not os.path.isdir(sft):
        raise XltError(f"mt_bench: {sft} not found (MT-Bench grades the run's SFT model)")
    judge = args.mt_bench_judge
    if not judge:
        raise XltError("mt_bench: true needs mt_bench_judge (a judge model spec or an OpenAI-compatible URL)")
    url = judge if judge.startswith(("http://", "https://")) else None
    o = MtBenchOptions(model=sft, questions=args.mt_bench_questions, max_questions=args.mt_bench_max_questions,
                       judge=None if url else judge, judge_url=url, judge_model=args.mt_bench_judge_model if url else None,
                       output=os.path.join(args.output_dir, "mt_bench"), max_new_tokens=args.mt_bench_max_new_tokens,
                       judge_max_tokens=args.mt_bench_judge_max_tokens, trust_remote_code=args.trust_remote_code,
                       replace_stale=True)
    check_early(o)
    load_inputs(o)
    return o


def stage_section(o: MtBenchOptions) -> dict:
    """The ``mt_bench`` section of report.json: the result, the judge and the files."""
    result = run_mt_bench(o)
    with open(os.path.join(o.output, "result.json"), encoding="utf-8") as f:
        saved = json.load(f)
    _log(f"sft: MT-Bench {result['score']} over {result['n']} judgments ({result['unparsed']} without a rating)")
    return {**result, **{k: saved[k] for k in ("judge", "answers", "judgments", "seconds_per_judgment")}}
