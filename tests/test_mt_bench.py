"""Japanese MT-Bench: FastChat's single-answer judging reproduced on the published files, judging backends, CLI."""

from __future__ import annotations

import json
import os

import pytest

from conftest import REPO, shared_file, tiny_llama
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
    wrong = {**published["prompts"], "single-v1": {**published["prompts"]["single-v1"], "output_format": "[[A]]"}}
    prompts.write_text("".join(json.dumps(p) + "\n" for p in wrong.values()), encoding="utf-8")
    with pytest.raises(XltError, match="single-v1 has output_format '\\[\\[A\\]\\]'"):
        mtb.load_judge_prompts(str(prompts))
    with pytest.raises(XltError, match="file not found"):
        mtb.load_questions(str(tmp_path / "none.jsonl"))
    some = {qid: a for qid, a in published["answers"].items() if qid != 3}
    with pytest.raises(XltError, match="has no answer to question 3"):
        mtb.matches(published["questions"], some, published["references"], published["prompts"])
    with pytest.raises(XltError, match="no reference answer to question 1 "):
        mtb.matches(published["questions"], published["answers"], {}, published["prompts"])


# ---------------------------------------------------------------------------------------------
# Judging through an OpenAI-compatible endpoint (a canned server on 127.0.0.1)
# ---------------------------------------------------------------------------------------------
class CannedJudge:
    """A chat-completions server answering with ``replies`` in order; ``status`` is the HTTP status of every
    reply, or a list of the first replies' statuses (200 after it)."""

    def __init__(self, replies, status=200, body=None):
        import http.server
        import threading

        self.replies, self.requests = list(replies), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                n = int(self.headers["Content-Length"])
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                       "body": json.loads(self.rfile.read(n))})
                code = (status.pop(0) if status else 200) if isinstance(status, list) else status
                data = body if body is not None or code != 200 else json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": outer.replies.pop(0)}}]}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                """No request log on stderr (the tests read it)."""

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _endpoint_args(url, out, *extra):
    return ["evaluate", "mt-bench", "--questions", str(shared_file(BENCH + "question.jsonl")),
            "--answers", str(shared_file(BENCH + f"model_answer_{ELYZA}.jsonl")), "--judge-url", url,
            "--judge-model", "org/my-judge", "--output", str(out), *extra]


def test_endpoint_judge_retries_unrated_verdicts_then_counts_them(tmp_path, monkeypatch, capsys):
    from xlt.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    # Writing questions 71 and 72, turns 1, 2, 1, 2: turn 2 of 71 never gets a rating (1 + 2 retries), turn 1
    # of 72 gets one on the first retry (the backup pattern [x]).
    server = CannedJudge(["Rating: [[7]]", "no verdict", "still none", "none again", "hmm", "Rating: [6]",
                          "Rating: [[9]]"])
    try:
        args = _endpoint_args(server.url, tmp_path, "--categories", "writing", "--max-questions", "2", "--json")
        assert main(args) == 0
        out = capsys.readouterr()
        r = json.loads(out.out)
        assert r["n"] == 4 and r["unparsed"] == 1
        assert (r["turn1"], r["turn2"], r["score"]) == (6.5, 9, pytest.approx(22 / 3))
        assert r["categories"] == {"writing": pytest.approx(22 / 3)} and not server.replies
        first = server.requests[0]
        assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-secret-123"
        assert first["body"]["model"] == "org/my-judge" and first["body"]["temperature"] == 0
        assert first["body"]["max_tokens"] == 2048
        assert [m["role"] for m in first["body"]["messages"]] == ["system", "user"]
        assert "sk-secret-123" not in out.out + out.err
        rows = mtb.load_judgments(str(tmp_path / "model_judgment" / "org--my-judge_single.jsonl"))
        assert [(j["question_id"], j["turn"], j["score"]) for j in rows] == [(71, 1, 7), (71, 2, -1), (72, 1, 6),
                                                                           (72, 2, 9)]
        assert rows[1]["judge"] == ["org/my-judge", "single-v1-multi-turn"] and rows[1]["model"] == ELYZA
        assert rows[1]["judgment"] == "none again"  # the last verdict is kept, with score -1
        # Resumed: every judgment is in the file, the endpoint is not asked again.
        assert main(args) == 0
        assert json.loads(capsys.readouterr().out) == r and len(server.requests) == 7
    finally:
        server.close()


def test_an_unreachable_judge_url_is_one_line_before_any_work(tmp_path, capsys, no_model_loading):
    import socket

    from xlt.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["evaluate", "mt-bench", "--model", "smollm2-135m", "--judge-url", f"http://127.0.0.1:{port}/v1",
            "--judge-model", "j", "--output", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"xlt: error: judge: cannot reach http://127.0.0.1:{port}/v1/chat/completions")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("status, body, message", [
    (401, b'{"error": "bad key"}', "answered HTTP 401"),
    (200, b'{"result": "ok"}', "replied without choices[0].message"),
])
def test_a_refusing_or_foreign_endpoint_is_one_line(tmp_path, monkeypatch, capsys, status, body, message):
    from xlt.cli import main

    monkeypatch.setenv("MY_KEY", "sk-never-shown")
    server = CannedJudge([], status=status, body=body)
    try:
        assert main(_endpoint_args(server.url, tmp_path, "--max-questions", "1", "--api-key-env", "MY_KEY")) == 2
    finally:
        server.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "sk-never-shown" not in err[0]
    assert server.requests[0]["auth"] == "Bearer sk-never-shown"


def test_busy_endpoint_is_retried_and_a_changed_answer_is_judged_again(tmp_path, published):
    from xlt.eval.mt_bench_models import EndpointChat
    from xlt.eval.mt_bench_run import judge_all

    server = CannedJudge(["Rating: [[4]]", "Rating: [[5]]"], status=[503, 429])
    try:
        judge = EndpointChat(server.url, "j", retry_sleep=0)
        assert judge.complete([{"role": "user", "content": "x"}], 0.0, 10) == "Rating: [[4]]"
        assert len(server.requests) == 3  # 503, 429, then the verdict
        q = [q for q in published["questions"] if q["question_id"] == 71]
        todo = mtb.matches(q, published["answers"], None, published["prompts"])[:1]
        path = str(tmp_path / "j_single.jsonl")
        mtb_row = {"question_id": 71, "model": ELYZA, "judge": ["j", "single-v1"], "user_prompt": "older answer",
                   "judgment": "[[9]]", "score": 9, "turn": 1}
        with open(path, "w") as f:
            f.write(json.dumps(mtb_row) + "\n")
        rows, _, new = judge_all(judge, todo, path, ELYZA, 10, 0)
        assert new == 1 and rows[0]["score"] == 5 and rows[0]["user_prompt"] == todo[0]["user_prompt"]
        assert [j["score"] for j in mtb.load_judgments(path)] == [9, 5]
    finally:
        server.close()


@pytest.mark.parametrize("args, message", [
    (["--max-questions", "-1"], "--max-questions=-1 must be >= 1"),
    (["--judge-max-tokens", "0"], "--judge-max-tokens=0 must be >= 1"),
    (["--judge-url", "http://127.0.0.1:9/v1"], "--judge-url and --judge-model go together"),
    (["--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "j", "--judge", "smollm2-135m"], "not both"),
    ([], "no judge"),
    (["--judge", "smollm2-135m", "--answers", "a.jsonl"], "--model DIR (its answers are generated) or --answers"),
    (["--judge", "smollm2-135m", "--categories", "poetry"], "--categories poetry: not in the question file"),
])
def test_bad_options_are_one_line_before_a_model_loads(tmp_path, capsys, no_model_loading, args, message):
    from xlt.cli import main

    base = ["evaluate", "mt-bench", "--model", "smollm2-135m", "--output", str(tmp_path),
            "--questions", str(shared_file(BENCH + "question.jsonl"))]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Answer generation
# ---------------------------------------------------------------------------------------------
class RecordingChat:
    deterministic = True

    def __init__(self):
        self.calls = []

    def new_conversation(self):
        self.calls.append("new")

    def complete(self, messages, temperature, max_new_tokens):
        self.calls.append(([dict(m) for m in messages], temperature))
        return f"answer {sum(c != 'new' for c in self.calls)}"


def test_both_turns_answered_at_fastchat_temperatures_turn_two_sees_turn_one(tmp_path):
    from xlt.eval.mt_bench_run import generate_answers

    questions = [{"question_id": 5, "category": "writing", "turns": ["q1", "q2"]},
                 {"question_id": 6, "category": "math", "turns": ["m1", "m2"]},
                 {"question_id": 7, "category": "stem", "turns": ["s1"]}]
    chat, path = RecordingChat(), str(tmp_path / "model_answer" / "m.jsonl")
    got = generate_answers(chat, questions[:2], path, "m", 16)
    assert chat.calls[0] == chat.calls[3] == "new"  # once per question, before its first turn
    chat.calls = [c for c in chat.calls if c != "new"]
    assert [t for _, t in chat.calls] == [0.7, 0.7, 0.0, 0.0]
    assert chat.calls[1][0] == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "answer 1"},
                                {"role": "user", "content": "q2"}]
    assert got[5]["choices"] == [{"index": 0, "turns": ["answer 1", "answer 2"]}]
    # Resumed: 5 and 6 are in the file and not regenerated; 7 (stem, 0.1) is.
    again = generate_answers(chat, questions, path, "m", 16)
    assert [c[1] for c in chat.calls[4:] if c != "new"] == [0.1] and again[5]["answer_id"] == got[5]["answer_id"]
    assert sorted(mtb.load_answers(path)) == [5, 6, 7]
    with pytest.raises(XltError, match="holds another model's answers"):
        generate_answers(chat, questions, path, "other", 16)


def test_an_xlt_sft_model_answers_in_its_training_format(tmp_path, embedded_tokenizer):
    from xlt.data.sft_format import generation_prompt_ids
    from xlt.eval.mt_bench_models import model_format, model_name

    (tmp_path / "xlt_sft.json").write_text(json.dumps({"prompt_format": "stablelm_alpaca", "chat_template": None,
                                                       "stop_token_ids": [2]}), encoding="utf-8")
    assert model_format(str(tmp_path), embedded_tokenizer) == ("stablelm_alpaca", [2])
    fmt, stops = model_format(str(tmp_path / "none"), embedded_tokenizer)  # no xlt_sft.json: the chat template
    assert fmt == "chat" and embedded_tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    ids = generation_prompt_ids([{"role": "user", "content": "東京"}, {"role": "assistant", "content": "はい"},
                                 {"role": "user", "content": "次"}], "stablelm_alpaca", embedded_tokenizer)
    text = embedded_tokenizer.decode(ids)
    assert text.count("### 指示:") == 2 and "はい" + embedded_tokenizer.eos_token in text
    assert text.endswith("### 応答: \n")
    (tmp_path / "run" / "sft").mkdir(parents=True)
    assert model_name(str(tmp_path / "run" / "sft")) == "run-sft" and model_name("org/name") == "org--name"


# ---------------------------------------------------------------------------------------------
# End to end on a tiny model: answerer and judge
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def untied_tiny_model_dir(tmp_path_factory, embedded_tokenizer) -> str:
    """``tiny_model_dir`` with untied embeddings: the tied random model greedily repeats the prompt's last
    token (a newline), so its answers strip to "" and would not show that answers reach the judge."""

    out = tmp_path_factory.mktemp("tiny-untied")
    model = tiny_llama(len(embedded_tokenizer), tie=False)
    model.config.eos_token_id = embedded_tokenizer.eos_token_id
    model.config.pad_token_id = embedded_tokenizer.pad_token_id
    model.save_pretrained(out)
    embedded_tokenizer.save_pretrained(out)
    return str(out)


def test_tiny_model_answers_and_judges_two_questions(tmp_path, untied_tiny_model_dir, capsys, monkeypatch):
    from xlt.cli import main

    tiny = untied_tiny_model_dir
    args = ["evaluate", "mt-bench", "--model", tiny, "--judge", tiny, "--model-id", "tiny",
            "--questions", str(shared_file(BENCH + "question.jsonl")), "--categories", "math,writing",
            "--max-questions", "2", "--max-new-tokens", "6", "--judge-max-tokens", "6", "--output", str(tmp_path),
            "--json"]
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    answers = mtb.load_answers(str(tmp_path / "model_answer" / "tiny.jsonl"))
    assert sorted(answers) == [31, 32]
    assert all(len(a["choices"][0]["turns"]) == 2 and all(a["choices"][0]["turns"]) for a in answers.values())
    judge_name = json.loads((tmp_path / "result.json").read_text())["judge"]
    rows = mtb.load_judgments(str(tmp_path / "model_judgment" / f"{judge_name}_single.jsonl"))
    assert [(j["question_id"], j["turn"], j["judge"][1]) for j in rows] == [
        (31, 1, "single-math-v1"), (31, 2, "single-math-v1-multi-turn"),
        (32, 1, "single-math-v1"), (32, 2, "single-math-v1-multi-turn")]
    # Every judgment attempted; a random model's verdicts rarely hold a rating, and those are counted.
    assert r["n"] == 4 and r["unparsed"] == sum(j["score"] == -1 for j in rows)
    assert set(r) == {"score", "turn1", "turn2", "categories", "n", "unparsed"}
    assert all(answers[j["question_id"]]["choices"][0]["turns"][j["turn"] - 1] in j["user_prompt"] for j in rows)
    assert all(j["judgment"] for j in rows)
    # Resumed: nothing is generated or judged again, no weights load.
    import transformers

    def boom(*a, **k):
        raise AssertionError("a resumed run with nothing left to do loaded a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    before = (tmp_path / "model_judgment" / f"{judge_name}_single.jsonl").read_text()
    ids = {q: a["answer_id"] for q, a in answers.items()}
    assert main(args) == 0 and json.loads(capsys.readouterr().out) == r
    assert (tmp_path / "model_judgment" / f"{judge_name}_single.jsonl").read_text() == before
    assert {q: a["answer_id"] for q, a in mtb.load_answers(str(tmp_path / "model_answer" / "tiny.jsonl")).items()} == ids


# ---------------------------------------------------------------------------------------------
# The evaluate stage (make evaluate MT_BENCH=1)
# ---------------------------------------------------------------------------------------------
def _stage_run(tmp_path, sft_dir=None):
    import shutil

    run = tmp_path / "run"
    (run / "heldout").mkdir(parents=True)
    (run / "heldout" / "ja.jsonl").write_text(json.dumps({"text": "今日は晴れ。"}, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
    if sft_dir:
        shutil.copytree(sft_dir, run / "sft")
    return run


def _stage_args(run, model, *extra):

    return ["--config", str(REPO / "recipes/smollm2-135m-ja/evaluate.yaml"), "--output_dir", str(run),
            "--model", model, "--eval_max_docs", "1", "--max_new_tokens", "2", "--speed_max_chars", "0",
            "--mt_bench", "true", "--mt_bench_questions", str(shared_file(BENCH + "question.jsonl")), *extra]


def test_evaluate_stage_puts_mt_bench_of_the_sft_model_in_report_json(tmp_path, untied_tiny_model_dir,
                                                                       embedded_tokenizer, capsys):
    from xlt.cli import run_recipe

    run = _stage_run(tmp_path, untied_tiny_model_dir)
    stop = embedded_tokenizer.convert_tokens_to_ids("<|im_end|>")
    (run / "sft" / "xlt_sft.json").write_text(json.dumps({"prompt_format": "chat", "chat_template": None,
                                                          "stop_token_ids": [stop]}), encoding="utf-8")
    assert run_recipe("evaluate", _stage_args(run, untied_tiny_model_dir, "--mt_bench_judge", untied_tiny_model_dir,
                                              "--mt_bench_max_questions", "1", "--mt_bench_max_new_tokens", "4",
                                              "--mt_bench_judge_max_tokens", "4")) == 0
    capsys.readouterr()
    section = json.loads((run / "report.json").read_text(encoding="utf-8"))["mt_bench"]
    assert section["n"] == 2 and section["judge"] == os.path.basename(untied_tiny_model_dir)
    assert section["answers"] == str(run / "mt_bench" / "model_answer" / "run-sft.jsonl")
    assert [a["model_id"] for a in mtb.load_answers(section["answers"]).values()] == ["run-sft"]
    assert len(mtb.load_judgments(section["judgments"])) == 2
    # The SFT model retrained in place: its old answers are set aside and the questions answered again.
    later = os.path.getmtime(section["answers"]) + 10
    os.utime(run / "sft" / "config.json", (later, later))
    first = mtb.load_answers(section["answers"])
    assert run_recipe("evaluate", _stage_args(run, untied_tiny_model_dir, "--mt_bench_judge", untied_tiny_model_dir,
                                              "--mt_bench_max_questions", "1", "--mt_bench_max_new_tokens", "4",
                                              "--mt_bench_judge_max_tokens", "4")) == 0
    capsys.readouterr()
    assert mtb.load_answers(section["answers"] + ".stale") == first
    assert list(first) == [1] and mtb.load_answers(section["answers"])[1]["answer_id"] != first[1]["answer_id"]


def test_cli_refuses_answers_older_than_the_model(tmp_path):
    from xlt.eval.mt_bench_run import check_stale_answers

    model, answers = tmp_path / "model", tmp_path / "a.jsonl"
    model.mkdir()
    (model / "config.json").write_text("{}")
    answers.write_text("{}\n")
    check_stale_answers(str(answers), str(model), replace=False)  # written after the model: kept
    os.utime(answers, (1, 1))
    with pytest.raises(XltError, match="is older than the model in"):
        check_stale_answers(str(answers), str(model), replace=False)


@pytest.mark.parametrize("extra, with_sft, message", [
    (["--mt_bench_judge", "smollm2-135m"], False, "mt_bench: {run}/sft not found"),
    ([], True, "mt_bench: true needs mt_bench_judge"),
    (["--mt_bench_judge", "smollm2-135m", "--mt_bench_max_questions", "-3"], True,
     "mt_bench_max_questions=-3 must be > 0"),
    (["--mt_bench_judge", "smollm2-135m", "--mt_bench_judge_max_tokens", "0"], True,
     "mt_bench_judge_max_tokens=0 must be > 0"),
    (["--mt_bench_judge", "http://127.0.0.1:9/v1"], True, "--judge-url and --judge-model go together"),
])
def test_evaluate_stage_checks_mt_bench_before_loading_a_model(tmp_path, tiny_model_dir, capsys, no_model_loading,
                                                               extra, with_sft, message):
    from xlt.cli import run_recipe

    run = _stage_run(tmp_path, tiny_model_dir if with_sft else None)
    assert run_recipe("evaluate", _stage_args(run, "smollm2-135m", *extra)) == 2
    err = capsys.readouterr().err
    assert message.format(run=run) in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# REPORT.md radar plot, the plain-text table and the model card
# ---------------------------------------------------------------------------------------------
def test_report_and_model_card_show_the_mt_bench_result(tmp_path, published):
    from test_report import _assert_png, synthetic_run

    from xlt.hub import model_card
    from xlt.report import build_report, format_table

    rows = [{**j, "score": mtb.parse_rating(j["judgment"])} for j in published["judgments"]]
    result = mtb.aggregate(rows, {q["question_id"]: q["category"] for q in published["questions"]})
    run = synthetic_run(tmp_path)
    report = json.loads(open(os.path.join(run, "report.json")).read())
    report["mt_bench"] = {**result, "judge": "gpt-4"}
    with open(os.path.join(run, "report.json"), "w") as f:
        json.dump(report, f)
    text = open(build_report(run), encoding="utf-8").read()
    assert "## Japanese MT-Bench" in text and "](plots/mt_bench.png)" in text
    _assert_png(os.path.join(run, "plots", "mt_bench.png"))
    for line in ("| overall | 4.1750 |", "| turn 1 | 5.0500 |", "| turn 2 | 3.3000 |",
                 f"| writing | {result['categories']['writing']:.4f} |",
                 "Judge `gpt-4`, 160 judgments, 0 without a rating"):
        assert line in text
    table = format_table(report)
    assert "MT-Bench (sft)" in table and "judge gpt-4" in table and "4.1750    5.0500    3.3000" in table
    card = model_card("org/name", report)
    assert "| overall | 4.1750 |" in card and "| turn 2 | 3.3000 |" in card
    # A run without MT-Bench: no section, no plot.
    del report["mt_bench"]
    with open(os.path.join(run, "report.json"), "w") as f:
        json.dump(report, f)
    os.remove(os.path.join(run, "plots", "mt_bench.png"))
    assert "MT-Bench" not in open(build_report(run), encoding="utf-8").read()
    assert not os.path.exists(os.path.join(run, "plots", "mt_bench.png"))


def test_make_evaluate_passes_mt_bench_settings():
    import subprocess

    def dry(*variables):
        out = subprocess.run(["make", "-n", "--no-print-directory", "evaluate", *variables], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return " ".join(out.stdout.replace("\\\n", " ").split())

    assert "--mt_bench" not in dry()
    assert "--mt_bench true --mt_bench_judge smollm2-135m" in dry("MT_BENCH=1")
    url = dry("MT_BENCH=1", "MT_BENCH_JUDGE=http://localhost:8000/v1", "MT_BENCH_JUDGE_MODEL=org/judge")
    assert "--mt_bench true --mt_bench_judge http://localhost:8000/v1 --mt_bench_judge_model org/judge" in url


# ---------------------------------------------------------------------------------------------
# The vLLM backend (vLLM is not installable here: a fake ``vllm`` module records what xlt asks of it)
# ---------------------------------------------------------------------------------------------
class FakeVllm:
    """``vllm.LLM`` / ``vllm.SamplingParams`` as documented for offline inference; ``generate`` answers each
    TokensPrompt with ``reply_ids`` followed by the first stop id."""

    def __init__(self, reply_ids):
        import types

        self.inits, self.calls = [], []
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

        class LLM:
            def __init__(self, **kwargs):
                fake.inits.append(kwargs)

            def generate(self, prompts, sampling_params, use_tqdm=True):
                fake.calls.append((prompts, sampling_params.kwargs))
                ids = [*reply_ids[len(fake.calls) - 1], *sampling_params.kwargs["stop_token_ids"][:1], 7]
                out = types.SimpleNamespace(token_ids=ids, text="(vLLM's own decoding, not used)")
                return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

        self.module = types.ModuleType("vllm")
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams


def test_vllm_backend_answers_both_turns_with_fastchat_temperatures_and_stop_tokens(
        tmp_path, untied_tiny_model_dir, embedded_tokenizer, monkeypatch, capsys):
    import sys

    import transformers

    from xlt.cli import main

    tok = embedded_tokenizer
    replies = [tok.encode(t, add_special_tokens=False) for t in ("東京です。", "大阪です。", "二", "四")]
    fake = FakeVllm(replies)
    monkeypatch.setitem(sys.modules, "vllm", fake.module)

    def boom(*a, **k):
        raise AssertionError("the vLLM backend loaded transformers weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    questions = {q["question_id"]: q for q in mtb.load_questions(str(shared_file(BENCH + "question.jsonl")))}
    qfile = tmp_path / "question.jsonl"  # one math question (greedy) and one writing question (0.7)
    qfile.write_text("".join(json.dumps(questions[i], ensure_ascii=False) + "\n" for i in (31, 71)), encoding="utf-8")
    server = CannedJudge(["Rating: [[3]]"] * 4)
    try:
        assert main(["evaluate", "mt-bench", "--model", untied_tiny_model_dir, "--backend", "vllm", "--model-id", "m",
                     "--questions", str(qfile), "--judge-prompts", str(shared_file(BENCH + "judge_prompts.jsonl")),
                     "--references", str(shared_file(BENCH + "reference_answer_gpt-4.jsonl")),
                     "--max-new-tokens", "9", "--judge-url", server.url, "--judge-model", "j",
                     "--output", str(tmp_path / "out"), "--json"]) == 0
    finally:
        server.close()
    assert json.loads(capsys.readouterr().out)["n"] == 4
    assert fake.inits == [{"model": untied_tiny_model_dir, "tokenizer": untied_tiny_model_dir,
                           "trust_remote_code": False, "seed": 0}]
    stop = tok.convert_tokens_to_ids("<|im_end|>")  # the chat template's end of turn (no xlt_sft.json)
    assert [c[1] for c in fake.calls] == [{"n": 1, "temperature": t, "max_tokens": 9, "stop_token_ids": [stop],
                                           "seed": 0} for t in (0.0, 0.0, 0.7, 0.7)]
    prompts = [tok.decode(c[0][0]["prompt_token_ids"]) for c in fake.calls]
    assert questions[31]["turns"][0] in prompts[0] and questions[31]["turns"][1] in prompts[1]
    assert "東京です。" in prompts[1] and "東京です。" not in prompts[0]  # turn 2 sees the first answer
    assert "二" in prompts[3] and questions[71]["turns"][1] in prompts[3]
    answers = mtb.load_answers(str(tmp_path / "out" / "model_answer" / "m.jsonl"))
    assert [answers[q]["choices"][0]["turns"] for q in (31, 71)] == [["東京です。", "大阪です。"], ["二", "四"]]


def test_backend_auto_picks_vllm_only_when_importable_on_a_gpu(monkeypatch):
    import sys

    import torch

    from xlt.eval.mt_bench_models import pick_backend

    monkeypatch.setitem(sys.modules, "vllm", FakeVllm([]).module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_backend("auto") == "transformers" and pick_backend("vllm") == "vllm"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_backend("auto") == "vllm" and pick_backend("transformers") == "transformers"
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed: import fails
    assert pick_backend("auto") == "transformers"


def test_backend_vllm_without_vllm_is_one_line_before_a_model_loads(tmp_path, monkeypatch, capsys,
                                                                       no_model_loading):
    import sys

    from xlt.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)
    assert main(["evaluate", "mt-bench", "--model", "smollm2-135m", "--backend", "vllm", "--judge", "smollm2-135m",
                 "--questions", str(shared_file(BENCH + "question.jsonl")), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--backend vllm: vLLM is not installed" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Bad input at the command line: one line, or a counted failure, never a traceback or a silent zero
# ---------------------------------------------------------------------------------------------
def test_a_file_in_another_layout_given_as_questions_is_one_line_before_any_work(tmp_path, capsys, no_model_loading):
    from xlt.cli import main

    answers = str(shared_file(BENCH + f"model_answer_{ELYZA}.jsonl"))  # FastChat answers, not questions
    assert main(["evaluate", "mt-bench", "--model", "smollm2-135m", "--judge", "smollm2-135m", "--questions", answers,
                 "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"questions: {answers}:1: 'category' missing or not a string (FastChat question layout" in err
    assert not any(tmp_path.iterdir())


def test_a_judge_that_never_gives_a_verdict_is_counted_not_a_zero(tmp_path, capsys):
    from xlt.cli import main
    from xlt.hub import model_card
    from xlt.report import format_table

    server = CannedJudge(["I cannot rate this.", "Neither this."])
    try:
        args = _endpoint_args(server.url, tmp_path, "--categories", "writing", "--max-questions", "1",
                              "--verdict-retries", "0")
        assert main([*args, "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r == {"score": None, "turn1": None, "turn2": None, "categories": {}, "n": 2, "unparsed": 2}
        assert main(args) == 0  # resumed: the two counted failures are read back, not asked again
        assert capsys.readouterr().out.startswith("MT-Bench score - (turn 1 -, turn 2 -) over 2 judgments, "
                                                  "2 without a rating")
    finally:
        server.close()
    report = {"mt_bench": {**r, "judge": "j"}}
    assert "| overall | - |" in model_card("org/name", report) and "0.0" not in format_table(report)


@pytest.mark.slow
def test_demo_model_answers_and_judges_a_slice_as_the_readme_run(tmp_path, capsys):
    """The README's CPU run on one question: the embedded instruct model answers (its chat template) and judges."""
    from xlt.cli import main

    args = ["evaluate", "mt-bench", "--model", "smollm2-135m", "--judge", "smollm2-135m", "--backend", "transformers",
            "--questions", str(shared_file(BENCH + "question.jsonl")), "--categories", "writing", "--max-questions",
            "1", "--max-new-tokens", "8", "--judge-max-tokens", "8", "--output", str(tmp_path), "--json"]
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["n"] == 2 and 0 <= r["unparsed"] <= 2
    answer = mtb.load_answers(str(tmp_path / "model_answer" / "smollm2-135m.jsonl"))[71]["choices"][0]["turns"]
    rows = mtb.load_judgments(str(tmp_path / "model_judgment" / "smollm2-135m_single.jsonl"))
    assert len(answer) == 2 and all(answer) and [j["turn"] for j in rows] == [1, 2]
    assert answer[1] in rows[1]["user_prompt"] and all(j["judgment"] for j in rows)
    assert r["unparsed"] == sum(j["score"] == -1 for j in rows)
