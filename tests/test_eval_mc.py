"""Japanese multiple choice (xlt/eval/mc.py), the run evaluation's mc section, and the lm-eval wrapper."""

from __future__ import annotations

import json

import pytest
import torch
from test_eval_bpc import CopyModel
from transformers import AutoTokenizer

from conftest import shared_file, tiny_llama
from xlt.config import XltError
from xlt.eval.mc import PROMPT, load_mc_rows, multiple_choice, wilson_interval
from xlt.models import load_model

FRUIT = ["みかん", "りんご", "ぶどう", "バナナ", "メロン"]


def rigged_rows() -> list[dict]:
    """Questions that repeat their answer: a copy model finds it, so the right answer is known."""
    rows = []
    for label, answer in enumerate(FRUIT):
        q = f"{answer}、{answer}、{answer}。くり返した果物は何？"
        rows.append({"question": q, "choices": list(FRUIT), "label": label})
    return rows


def reference_scores(model, tok, rows: list[dict]) -> list[list[float]]:
    """The scoring by hand: a plain forward pass of start + prompt + choice for each choice, summing the log
    probabilities of the choice's tokens (the continuation after the prompt without its trailing space)."""
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    out = []
    for row in rows:
        prompt = PROMPT.format(question=row["question"])
        ctx = [start] + tok(prompt.rstrip(" "), add_special_tokens=False)["input_ids"]
        wholes = [[start] + tok(prompt + c, add_special_tokens=False)["input_ids"] for c in row["choices"]]
        assert all(w[: len(ctx)] == ctx for w in wholes)
        width = max(map(len, wholes))
        # One batch per question, right-padded: causal attention never lets a position see the padding after it.
        batch = torch.tensor([w + [start] * (width - len(w)) for w in wholes])
        with torch.no_grad():
            logp = torch.log_softmax(model(batch).logits.float(), -1)
        out.append([sum(float(logp[r, i - 1, w[i]]) for i in range(len(ctx), len(w))) for r, w in enumerate(wholes)])
    return out


def reference_accuracy(rows: list[dict], scores: list[list[float]], norm: bool) -> tuple[int, int]:
    """(correct answers by argmax, first on ties; rows whose top two are within 1e-3: a float-order flip there
    is not a scoring difference)."""
    correct = near_ties = 0
    for row, raw in zip(rows, scores):
        s = [x / len(c) for x, c in zip(raw, row["choices"])] if norm else raw
        order = sorted(range(len(s)), key=lambda i: -s[i])
        correct += max(range(len(s)), key=lambda i: s[i]) == row["label"]
        near_ties += s[order[0]] - s[order[1]] < 1e-3
    return correct, near_ties


def assert_matches_reference(out: dict, rows: list[dict], scores: list[list[float]]) -> None:
    n = len(rows)
    assert out["n"] == n and out["skipped"] == 0
    for key, ci, norm in (("accuracy", "ci95", False), ("accuracy_norm", "ci95_norm", True)):
        k, ties = reference_accuracy(rows, scores, norm)
        got = round(out[key] * n)
        assert abs(got - k) <= ties and out[key] == got / n, (key, out[key], k, ties)
        assert out[ci] == pytest.approx(list(wilson_interval(got, n)))


def test_wilson_interval_matches_the_formula_by_hand():
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)  # Wilson 1927; e.g. statsmodels proportion_confint
    for n in (1, 6, 20, 1119):
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
        assert all(lo <= k / n <= hi for k in range(n + 1) for lo, hi in [wilson_interval(k, n)])


def test_mc_finds_the_known_answer_and_scores_are_log_likelihoods(embedded_tokenizer):
    tok = embedded_tokenizer
    rows = rigged_rows()
    r = multiple_choice(CopyModel(len(tok)), tok, rows, batch_size=7)
    assert r["n"] == 5 and r["accuracy"] == 1.0 and r["accuracy_norm"] == 1.0
    assert r["ci95"][0] < 1.0 and r["ci95"][1] == pytest.approx(1.0)
    # Against a plain forward pass of prompt + choice through a real transformer.
    model = tiny_llama(len(tok), seed=4).eval()
    r = multiple_choice(model, tok, rows[:2], batch_size=3)
    ref = reference_scores(model, tok, rows[:2])
    assert sum(r["scores"], []) == pytest.approx(sum(ref, []), rel=1e-4, abs=1e-4)
    acc = sum(max(range(5), key=lambda i: s[i]) == row["label"] for row, s in zip(rows[:2], r["scores"])) / 2
    assert r["accuracy"] == acc


def test_length_normalisation_is_per_character(embedded_tokenizer):
    tok = embedded_tokenizer
    # The answer is long and repeated in the question; the raw score prefers a short wrong choice.
    long_answer = "さくらんぼのタルト"
    row = {"question": f"{long_answer}、{long_answer}。", "choices": [long_answer, "あ", "い", "う", "え"], "label": 0}
    r = multiple_choice(CopyModel(len(tok), alpha=3.0), tok, [row])
    raw = r["scores"][0]
    norm = [s / len(c) for s, c in zip(raw, row["choices"])]
    assert r["accuracy_norm"] == float(max(range(5), key=lambda i: norm[i]) == 0)
    assert r["accuracy"] == float(max(range(5), key=lambda i: raw[i]) == 0)
    assert r["accuracy_norm"] == 1.0 and r["accuracy"] == 0.0


def test_mc_command_on_the_shared_jcommonsenseqa_file(tiny_model_dir, capsys):
    from xlt.cli import main

    path = shared_file("jcommonsenseqa_valid.jsonl")
    assert main(["evaluate", "mc", "--model", tiny_model_dir, "--data", str(path), "--max-n", "20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"accuracy", "accuracy_norm", "n", "ci95"} <= set(out)
    rows, _ = load_mc_rows(str(path), max_n=20)
    model = load_model(tiny_model_dir).eval()  # the weights as the command loads them; the scoring by hand
    assert_matches_reference(out, rows, reference_scores(model, AutoTokenizer.from_pretrained(tiny_model_dir), rows))


@pytest.mark.slow
def test_mc_with_the_demo_model_on_the_shared_file(capsys, embedded_tokenizer):
    """The demo's base model (embedded SmolLM2-135M) on the first 10 shared questions: its accuracy is the one
    the hand scoring (a plain forward pass per choice) gives."""
    from xlt.cli import main

    path = shared_file("jcommonsenseqa_valid.jsonl")
    assert main(["evaluate", "mc", "--model", "smollm2-135m", "--data", str(path), "--max-n", "10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows, _ = load_mc_rows(str(path), max_n=10)
    model = load_model("smollm2-135m").eval()
    assert_matches_reference(out, rows, reference_scores(model, embedded_tokenizer, rows))


def test_a_file_with_no_usable_rows_is_one_line_naming_it(tmp_path, capsys):
    from xlt.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choice0": "a", "label": 0}) + "\n"
                   + json.dumps({"question": "q", **{f"choice{i}": "x" for i in range(5)}, "label": 7}) + "\n",
                   encoding="utf-8")
    with pytest.raises(XltError, match="bad.jsonl has no usable"):
        load_mc_rows(str(bad))
    assert main(["evaluate", "mc", "--model", "smollm2-135m", "--data", str(bad), "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "no usable" in err[0]


def _ten_rows(tmp_path):
    src = shared_file("jcommonsenseqa_valid.jsonl")
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()][:10]
    data = tmp_path / "data"
    data.mkdir()
    (data / "jcommonsenseqa_valid.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data


def test_harness_task_config_points_at_local_files(tmp_path):
    import yaml

    from xlt.eval.harness import task_config, write_task_configs

    data = _ten_rows(tmp_path)
    cfg = task_config("jcommonsenseqa", str(data))
    assert cfg["dataset_path"] == "json" and cfg["output_type"] == "multiple_choice"
    assert cfg["dataset_kwargs"] == {"data_files": {"validation": str(data / "jcommonsenseqa_valid.jsonl")}}
    assert cfg["validation_split"] == "validation" and cfg["num_fewshot"] == 0  # no train file: zero-shot
    assert cfg["doc_to_target"] == "label" and cfg["target_delimiter"] == "\n"
    assert "choice4" in cfg["doc_to_choice"] and "{{ question }}" in cfg["doc_to_text"]
    (data / "jcommonsenseqa_train.jsonl").write_text((data / "jcommonsenseqa_valid.jsonl").read_text("utf-8"),
                                                    encoding="utf-8")
    cfg = task_config("jcommonsenseqa", str(data))
    assert cfg["num_fewshot"] == 3 and cfg["fewshot_split"] == "train"
    assert cfg["dataset_kwargs"]["data_files"]["train"] == str(data / "jcommonsenseqa_train.jsonl")
    out = tmp_path / "tasks"
    out.mkdir()
    names = write_task_configs(["jcommonsenseqa"], str(data), str(out))
    assert yaml.safe_load((out / f"{names['jcommonsenseqa']}.yaml").read_text("utf-8")) == cfg
    with pytest.raises(XltError, match="unknown task 'jnli'"):
        task_config("jnli", str(data))
    with pytest.raises(XltError, match="not found"):
        task_config("jcommonsenseqa", str(tmp_path))


def test_harness_runs_lm_eval_on_a_tiny_model(tmp_path, tiny_model_dir, capsys):
    from xlt.cli import main
    from xlt.eval.harness import lm_eval_available

    # make setup installs the eval extra: this test runs in every make test, it never skips.
    assert lm_eval_available(), "lm-eval is not installed: run make setup (it installs xlt[eval])"
    data = _ten_rows(tmp_path)
    assert main(["evaluate", "harness", "--model", tiny_model_dir, "--tasks", "jcommonsenseqa", "--data-dir",
                 str(data), "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == {"jcommonsenseqa": 10}
    acc = out["results"]["jcommonsenseqa"]["acc"]
    assert 0.0 <= acc <= 1.0 and acc * 10 == pytest.approx(round(acc * 10))


def test_evaluate_run_reports_mc_for_base_cpt_and_sft(tmp_path, tiny_model_dir, embedded_tokenizer, capsys):
    import shutil

    from conftest import REPO
    from xlt.cli import run_recipe
    from xlt.report import format_table

    run = tmp_path / "run"
    (run / "heldout").mkdir(parents=True)
    (run / "heldout" / "ja.jsonl").write_text(json.dumps({"text": "今日は晴れ。"}, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
    shutil.copytree(tiny_model_dir, run / "cpt")
    sft = tiny_llama(len(embedded_tokenizer), seed=9)
    sft.save_pretrained(run / "sft")
    embedded_tokenizer.save_pretrained(run / "sft")
    data = _ten_rows(tmp_path)
    wiki = tmp_path / "wiki.jsonl"  # text from outside the run's sources: scored per stage under its stem
    wiki.write_text(json.dumps({"text": "梅雨は東アジアの気象現象です。"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert run_recipe("evaluate", ["--config", str(REPO / "recipes/smollm2-135m-ja/evaluate.yaml"),
                                   "--output_dir", str(run), "--model", tiny_model_dir, "--eval_max_docs", "1",
                                   "--max_new_tokens", "2", "--mc_data", str(data / "jcommonsenseqa_valid.jsonl"),
                                   "--mc_max_n", "6", "--heldout_files", str(wiki)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((run / "report.json").read_text(encoding="utf-8"))
    mc = report["mc"]
    assert {"base", "cpt", "sft"} <= set(mc)
    for stage in ("base", "cpt", "sft"):
        assert mc[stage]["n"] == 6 and mc[stage]["ci95"][0] <= mc[stage]["accuracy"] <= mc[stage]["ci95"][1]
    assert mc["base"] == mc["cpt"]  # the same weights: the same answers
    assert report["speed"]["sft"]["tokens_per_second"] > 0  # the model card states it with the device
    assert report["speed"]["sft"]["device"] == f"CPU, {torch.get_num_threads()} thread" + \
        ("s" if torch.get_num_threads() > 1 else "")
    assert set(report["bpc"]) == {"ja", "wiki"} and report["eval"]["heldout_files"] == [str(wiki)]
    assert report["bpc"]["wiki"]["base"] == report["bpc"]["wiki"]["cpt"] != report["bpc"]["wiki"]["sft"]
    table = format_table(report)
    assert "multiple choice" in table and "multiple choice" in printed
    assert f"{mc['sft']['accuracy']:.4f}" in table.split("multiple choice")[1].splitlines()[1]


def test_evaluate_run_checks_mc_data_before_loading_a_model(tmp_path, capsys):
    from conftest import REPO
    from xlt.cli import run_recipe

    run = tmp_path / "run"
    (run / "heldout").mkdir(parents=True)
    (run / "heldout" / "ja.jsonl").write_text(json.dumps({"text": "晴れ"}, ensure_ascii=False) + "\n", encoding="utf-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    assert run_recipe("evaluate", ["--config", str(REPO / "recipes/smollm2-135m-ja/evaluate.yaml"),
                                   "--output_dir", str(run), "--mc_data", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"xlt: error: mc_data: {empty} has no usable multiple-choice rows (need question, "
                   "choice0..choice4, label 0-4)"]
    missing = tmp_path / "nope.jsonl"
    assert run_recipe("evaluate", ["--config", str(REPO / "recipes/smollm2-135m-ja/evaluate.yaml"),
                                   "--output_dir", str(run), "--heldout_files", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "heldout_files" in err[0] and str(missing) in err[0]


def test_shared_prefix_scores_equal_full_passes(embedded_tokenizer):
    """Each question's prompt runs once (cache repeated per choice); the scores equal one full pass per choice."""
    from xlt.eval.mc import _choice_logprobs, _split_continuation, continuation_logprobs

    tok = embedded_tokenizer
    rows, _ = load_mc_rows(str(shared_file("jcommonsenseqa_valid.jsonl")), max_n=12)
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    pairs = [_split_continuation(tok, PROMPT.format(question=r["question"]), c, start)
             for r in rows for c in r["choices"]]
    assert len({len(pairs[q][0]) for q in range(0, len(pairs), 5)}) > 1  # contexts of several lengths
    model = tiny_llama(len(tok), seed=7).eval()
    full = continuation_logprobs(model, pairs, start, batch_size=4)
    shared = _choice_logprobs(model, pairs, 5, start, batch_size=3, max_length=1024)
    assert shared == pytest.approx(full, rel=1e-4, abs=1e-4)
    # A question longer than max_length falls back to full (left-truncated) passes, like lm-eval.
    short = max(len(c) + len(x) for c, x in pairs[:5]) - 1
    assert _choice_logprobs(model, pairs[:5], 5, start, 2, short) == pytest.approx(
        continuation_logprobs(model, pairs[:5], start, 2, short), rel=1e-4, abs=1e-4)


def test_make_setup_installs_the_eval_extra_the_harness_test_needs():
    import re
    import subprocess

    from conftest import REPO

    out = subprocess.run(["make", "-n", "--no-print-directory", "setup"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    installs = re.findall(r'pip install -q -e "\.\[([\w,]+)\]"', out.stdout)
    assert len(installs) == 1, out.stdout
    extras = set(installs[0].split(","))
    assert {"demo", "mecab", "dev", "eval"} <= extras
    assert re.search(r'^eval = \[[^]]*"lm-eval', (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.M)
