"""Japanese MT-Bench: FastChat's single-answer judging reproduced on the published files, judging backends, CLI."""

from __future__ import annotations

import json

import pytest

from tests.conftest import shared_file
from xlt.config import XltError
from xlt.eval import mt_bench as mtb

BENCH = "japanese_mt_bench/"
ELYZA = "ELYZA-japanese-Llama-2-7b-fast-instruct"


@pytest.fixture(scope="module")
def published():
    """The shared question set, judge prompts, GPT-4 references, ELYZA's answers and GPT-4's judgments of them."""
    return {"questions": mtb.load_questions(str(shared_file(BENCH + "question.jsonl"))),
            "prompts": mtb.load_judge_prompts(str(shared_file(BENCH + "judge_prompts.jsonl"))),
            "references": mtb.load_answers(str(shared_file(BENCH + "reference_answer_gpt-4.jsonl")), "references"),
            "answers": mtb.load_answers(str(shared_file(BENCH + f"model_answer_{ELYZA}.jsonl"))),
            "judgments": mtb.load_judgments(str(shared_file(BENCH + f"model_judgment_gpt-4_single_{ELYZA}.jsonl")))}


def test_published_files_load_in_fastchat_layouts(published):
    assert len(published["questions"]) == 80
    assert {q["category"] for q in published["questions"]} == set(mtb.TEMPERATURE)
    assert len(published["answers"]) == 80 and len(published["references"]) == 80
    assert len(published["judgments"]) == 160


def test_judge_prompts_are_byte_identical_to_the_stored_gpt4_prompts(published):
    built = {(m["question_id"], m["turn"]): m for m in mtb.matches(published["questions"], published["answers"],
                                                                    published["references"], published["prompts"])}
    assert len(built) == 160
    for j in published["judgments"]:
        m = built[(j["question_id"], j["turn"])]
        assert m["prompt"] == j["judge"][1], (j["question_id"], j["turn"])
        assert m["user_prompt"].encode("utf-8") == j["user_prompt"].encode("utf-8"), (j["question_id"], j["turn"])
    # Every reference-based prompt carries the reference; single-v1 prompts do not.
    assert sum(m["prompt"].startswith("single-math") for m in built.values()) == 60


def test_parsing_each_stored_verdict_gives_the_stored_score(published):
    for j in published["judgments"]:
        assert mtb.parse_rating(j["judgment"]) == j["score"], j["question_id"]


def test_aggregate_reproduces_fastchat_show_result(published):
    # Scores re-parsed from the verdict text, not the stored ones: the whole chain is recomputed.
    rows = [{**j, "score": mtb.parse_rating(j["judgment"])} for j in published["judgments"]]
    cats = {q["question_id"]: q["category"] for q in published["questions"]}
    r = mtb.aggregate(rows, cats)
    assert (round(r["turn1"], 4), round(r["turn2"], 4), round(r["score"], 4)) == (5.05, 3.3, 4.175)
    assert r["n"] == 160 and r["unparsed"] == 0 and set(r["categories"]) == set(mtb.TEMPERATURE)
    by_cat = [j["score"] for j in rows if cats[j["question_id"]] == "writing"]
    assert r["categories"]["writing"] == pytest.approx(sum(by_cat) / len(by_cat))


def test_rating_patterns_follow_fastchat():
    assert mtb.parse_rating("Rating: [[7]]") == 7
    assert mtb.parse_rating("Rating: [[7.5]] and [[3]]") == 7.5
    assert mtb.parse_rating("see [2] ... Rating: [8]") == 2  # the backup pattern takes the first [x]
    assert mtb.parse_rating("[[8]] after [2]") == 8  # [[x]] wins over an earlier [x]
    assert mtb.parse_rating("no verdict here") == -1
    # Unparsed judgments are counted, not averaged.
    r = mtb.aggregate([{"question_id": 1, "turn": 1, "score": 4}, {"question_id": 1, "turn": 2, "score": -1}],
                      {1: "math"})
    assert (r["score"], r["turn1"], r["turn2"], r["n"], r["unparsed"]) == (4, 4, None, 2, 1)


@pytest.mark.parametrize("line, message", [
    ('{"question_id": "1", "category": "math", "turns": ["a", "b"]}', "'question_id' missing or not an integer"),
    ('{"question_id": 1, "turns": ["a", "b"]}', "'category' missing or not a string"),
    ('{"question_id": 1, "category": "math", "turns": "a"}', "'turns' must be a non-empty list of strings"),
    ('{"question_id": 1, "category": "math", "turns": ["a"]', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
])
def test_a_question_file_in_the_wrong_layout_is_one_line_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 7, "category": "math", "turns": ["a", "b"]}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(XltError) as e:
        mtb.load_questions(str(path))
    assert f"{path}:3:" in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_other_layout_errors_name_the_file(tmp_path, published):
    answers = tmp_path / "a.jsonl"
    answers.write_text('{"question_id": 1, "model_id": "m", "choices": [{"turns": [1]}]}\n', encoding="utf-8")
    with pytest.raises(XltError, match=f"{answers}:1: 'turns'"):
        mtb.load_answers(str(answers))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps(published["prompts"]["single-v1"]) + "\n", encoding="utf-8")
    with pytest.raises(XltError, match="lacks single-math-v1, single-v1-multi-turn"):
        mtb.load_judge_prompts(str(prompts))
    with pytest.raises(XltError, match="file not found"):
        mtb.load_questions(str(tmp_path / "none.jsonl"))
    some = {qid: a for qid, a in published["answers"].items() if qid != 3}
    with pytest.raises(XltError, match="has no answer to question 3"):
        mtb.matches(published["questions"], some, published["references"], published["prompts"])
    with pytest.raises(XltError, match="no reference answer to question 1 "):
        mtb.matches(published["questions"], published["answers"], {}, published["prompts"])
