"""Instruction data (xlt/data/sft.py): each dataset's real column layout → conversations; the mixture's counts.

Fixture rows are written in each public dataset's own columns (jsonl, .json arrays or parquet in tmp_path).
"""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xlt.config import XltError
from xlt.data.sft import (
    LAYOUTS,
    SFT_COUNT_KEYS,
    check_sft_specs,
    counts_balance,
    load_sft_data,
    parse_hh_dialogue,
)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def user(content, input_text=None):
    t = {"role": "user", "content": content}
    return t | {"input": input_text} if input_text else t


def bot(content):
    return {"role": "assistant", "content": content}


# ---------------------------------------------------------------------------------------------
# Rows in each dataset's exact layout
# ---------------------------------------------------------------------------------------------
FUJIKI_ALPACA = [  # fujiki/japanese_alpaca_data
    {"instruction": "健康を保つための3つのコツを教えてください。", "input": "",
     "output": "1. バランスの良い食事をとる。2. 定期的に運動する。3. 十分に眠る。"},
    {"instruction": "次の文を英語に翻訳してください。", "input": "今日は晴れです。", "output": "It is sunny today."},
]
TATSU_ALPACA = [  # tatsu-lab/alpaca: `text` is the pre-rendered English prompt, ignored
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat a balanced diet.", "text": "Below is an instruction ... ### Response:\n1. Eat a balanced diet."},
    {"instruction": "Classify the sentiment.", "input": "I love it.", "output": "Positive.",
     "text": "Below is an instruction ... ### Input:\nI love it. ### Response:\nPositive."},
]
DOLLY_JA = [  # kunishou/databricks-dolly-15k-ja
    {"output": "ヴァージン・オーストラリア航空は2000年8月31日に運航を開始した。", "input": "ヴァージン・オーストラリア航空は…",
     "index": "0", "category": "closed_qa", "instruction": "ヴァージン・オーストラリア航空はいつから運航を開始したのですか？"},
    {"output": "", "input": "", "index": "1", "category": "classification", "instruction": "どれが魚の種類か？"},
    {"output": "ラクダは脂肪をこぶに蓄える。", "input": "", "index": "2", "category": "open_qa",
     "instruction": "ラクダはなぜ水なしで長く生きられるのですか？"},
]
DOLLY_EN = [  # databricks/databricks-dolly-15k
    {"instruction": "When did Virgin Australia start operating?",
     "context": "Virgin Australia commenced services on 31 August 2000.",
     "response": "Virgin Australia commenced services on 31 August 2000.", "category": "closed_qa"},
    {"instruction": "Which is a species of fish? Tope or Rope", "context": "", "response": "Tope",
     "category": "classification"},
]
HH_JA = [  # kunishou/hh-rlhf-49k-ja (ng_translation "1": the translation failed, instruction left in English)
    {"instruction": "猫の爪を切るにはどうすればいいですか？", "output": "まず猫を落ち着かせてから…",
     "index": "0", "ng_translation": "0", "instruction_en": "How do I trim my cat's claws?",
     "output_en": "First calm your cat..."},
    {"instruction": "What is the capital of France?", "output": "パリです。", "index": "1", "ng_translation": "1",
     "instruction_en": "What is the capital of France?", "output_en": "Paris."},
    {"instruction": "おすすめの本は？", "output": "『吾輩は猫である』です。", "index": "2", "ng_translation": "0",
     "instruction_en": "Any book recommendations?", "output_en": "I Am a Cat."},
]
HH_EN = [  # Anthropic/hh-rlhf: whole dialogues as text
    {"chosen": "\n\nHuman: What are some good houseplants?\n\nAssistant: Pothos and snake plants are easy."
               "\n\nHuman: Which needs less light?\n\nAssistant: The snake plant.\n\nIt tolerates shade.",
     "rejected": "\n\nHuman: What are some good houseplants?\n\nAssistant: I don't know."
                 "\n\nHuman: Which needs less light?\n\nAssistant: No idea."},
    {"chosen": "\n\nHuman: Say hi.\n\nAssistant: Hi!", "rejected": "\n\nHuman: Say hi.\n\nAssistant: No."},
    {"chosen": "Assistant: hello\n\nHuman: out of order", "rejected": ""},  # malformed: counted
]
MESSAGES = [
    {"messages": [{"role": "system", "content": "あなたは親切なアシスタントです。"},
                  {"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "こんにちは！"},
                  {"role": "user", "content": "元気？"}, {"role": "assistant", "content": "元気です。"}]},
    {"messages": [{"role": "user", "content": "1+1は？"}, {"role": "assistant", "content": "2です。"}]},
]
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "富士山の高さは？"}, {"from": "gpt", "value": "3776mです。"}]},
]

EXPECTED = {
    "fujiki": [[user(FUJIKI_ALPACA[0]["instruction"]), bot(FUJIKI_ALPACA[0]["output"])],
               [user("次の文を英語に翻訳してください。", "今日は晴れです。"), bot("It is sunny today.")]],
    "tatsu": [[user("Give three tips for staying healthy."), bot("1. Eat a balanced diet.")],
              [user("Classify the sentiment.", "I love it."), bot("Positive.")]],
    "dolly_ja": [[user(DOLLY_JA[0]["instruction"], DOLLY_JA[0]["input"]), bot(DOLLY_JA[0]["output"])],
                 [user(DOLLY_JA[2]["instruction"]), bot(DOLLY_JA[2]["output"])]],
    "dolly_en": [[user(DOLLY_EN[0]["instruction"], DOLLY_EN[0]["context"]), bot(DOLLY_EN[0]["response"])],
                 [user("Which is a species of fish? Tope or Rope"), bot("Tope")]],
    "hh_ja": [[user(HH_JA[0]["instruction"]), bot(HH_JA[0]["output"])],
              [user("おすすめの本は？"), bot("『吾輩は猫である』です。")]],
    "hh_en": [[user("What are some good houseplants?"), bot("Pothos and snake plants are easy."),
               user("Which needs less light?"), bot("The snake plant.\n\nIt tolerates shade.")],
              [user("Say hi."), bot("Hi!")]],
    "messages": [MESSAGES[0]["messages"], MESSAGES[1]["messages"]],
    "sharegpt": [[user("富士山の高さは？"), bot("3776mです。")]],
}
# name: (rows, adapter, writer, layout auto must find, counts of dropped rows)
CASES = {
    "fujiki": (FUJIKI_ALPACA, "alpaca", jsonl, "alpaca", {}),
    "tatsu": (TATSU_ALPACA, "alpaca", parquet, "alpaca", {}),
    "dolly_ja": (DOLLY_JA, "dolly", jsonl, "alpaca", {"empty": 1}),
    "dolly_en": (DOLLY_EN, "dolly", parquet, "dolly", {}),
    "hh_ja": (HH_JA, "hh_rlhf", jsonl, "hh_rlhf_ja", {"failed_translation": 1}),
    "hh_en": (HH_EN, "hh_rlhf", jsonl, "hh_rlhf", {"malformed": 1}),
    "messages": (MESSAGES, "messages", parquet, "messages", {}),
    "sharegpt": (SHAREGPT, "messages", jsonl, "conversations", {}),
}


def write_case(tmp_path, name):
    rows, _, writer, _, _ = CASES[name]
    return writer(tmp_path / (name + (".parquet" if writer is parquet else ".jsonl")), rows)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("adapter", ["named", "auto"])
def test_each_layout_becomes_conversations(tmp_path, name, adapter):
    rows, named, _, _, dropped = CASES[name]
    path = write_case(tmp_path, name)
    data = load_sft_data([{"adapter": named if adapter == "named" else "auto", "path": path}])
    assert [ex["messages"] for ex in data.train] == EXPECTED[name]
    assert {ex["source"] for ex in data.train} == {path.rsplit("/", 1)[1]}
    c = data.counts[path.rsplit("/", 1)[1]]
    assert c["rows"] == len(rows) and c["train"] == len(EXPECTED[name]) and data.eval == []
    assert {k: v for k, v in c.items() if k in ("empty", "failed_translation", "malformed", "duplicates") and v} \
        == dropped
    assert counts_balance(c)


def test_auto_picks_each_datasets_layout(tmp_path, monkeypatch):
    import xlt.data.sft as sft

    picked = []
    real = sft.match_layout

    def spy(*args, **kwargs):
        layout = real(*args, **kwargs)
        picked.append(layout.name)
        return layout

    monkeypatch.setattr(sft, "match_layout", spy)
    for name in sorted(CASES):
        picked.clear()
        load_sft_data([{"adapter": "auto", "path": write_case(tmp_path, name)}])
        assert set(picked) == {CASES[name][3]}, name


def test_json_array_file_and_embedded_pairs(tmp_path):
    # kunishou's sets ship as one .json array (databricks-dolly-15k-ja.json, mpt_hhrlhf_49k_ja.json)
    arr = tmp_path / "databricks-dolly-15k-ja.json"
    arr.write_text(json.dumps(DOLLY_JA, ensure_ascii=False, indent=1), encoding="utf-8")
    data = load_sft_data([{"adapter": "dolly", "path": str(arr)},
                          {"adapter": "chatterbot", "embedded": "chatterbot-ja", "max_examples": 5}])
    assert [ex["messages"] for ex in data.train[:2]] == EXPECTED["dolly_ja"]
    chat = [ex for ex in data.train if ex["source"] == "chatterbot-ja"]
    assert len(chat) == 5 and all([t["role"] for t in ex["messages"]] == ["user", "assistant"] for ex in chat)
    assert data.counts["chatterbot-ja"]["capped"] > 0 and counts_balance(data.counts["chatterbot-ja"])


def test_hh_dialogue_parsing():
    turns = parse_hh_dialogue(HH_EN[0]["chosen"])
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[3]["content"] == "The snake plant.\n\nIt tolerates shade."  # a blank line inside a turn stays
    for bad, reason in [("Assistant: hi\n\nHuman: x", "malformed"), ("no speakers at all", "malformed"),
                        ("\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "malformed"), (None, "malformed"),
                        ("\n\nHuman: hello\n\nAssistant:", "empty"), ("\n\nHuman: hello", "empty")]:
        assert parse_hh_dialogue(bad).reason == reason, bad
    # a last Human turn (no answer) is trimmed, the answered turns kept
    assert parse_hh_dialogue("\n\nHuman: a\n\nAssistant: b\n\nHuman: c") == [user("a"), bot("b")]


# ---------------------------------------------------------------------------------------------
# Layout and spec errors: one line, before any model loads
# ---------------------------------------------------------------------------------------------
def test_a_file_matching_no_layout_lists_the_layouts(tmp_path):
    path = jsonl(tmp_path / "qa.jsonl", [{"question": "日本の首都は？", "answer": "東京"}])
    with pytest.raises(XltError) as e:
        check_sft_specs([{"adapter": "auto", "path": path}])
    msg = one_line(e)
    assert msg.startswith("sft_datasets[0]: ") and "qa.jsonl" in msg and "fields: question, answer" in msg
    for layout in LAYOUTS.values():
        assert layout.describe() in msg
    assert "instruction, output, input?" in msg and "chosen, rejected?" in msg
    with pytest.raises(XltError) as e:
        check_sft_specs([{"adapter": "dolly", "path": path}])
    assert "matches no layout of adapter dolly" in one_line(e) and "instruction, response" in str(e.value)
    with pytest.raises(XltError, match=r"has no field 'output' \(fields: instruction, answer\)"):
        check_sft_specs([{"adapter": "alpaca", "path": jsonl(tmp_path / "a.jsonl", [{"instruction": "x",
                                                                                      "answer": "y"}])}])


def test_messages_of_the_wrong_shape_fail_the_check(tmp_path):
    path = jsonl(tmp_path / "m.jsonl", [{"messages": [{"speaker": "user", "text": "x"}]}] * 3)
    with pytest.raises(XltError) as e:
        check_sft_specs([{"adapter": "messages", "path": path}])
    assert one_line(e) == (f"sft_datasets[0]: {path}:1: not a messages conversation "
                           "(messages turn 1 has role None (expected system, user or assistant))")


@pytest.mark.parametrize("spec,message", [
    ({"adapter": "alpaca", "path": "P", "weight": "x"}, "sft_datasets[0]: weight: expected a number, got a string 'x'"),
    ({"adapter": "alpaca", "path": "P", "weight": 0}, "sft_datasets[0]: weight=0 must be > 0"),
    ({"adapter": "alpaca", "path": "P", "max_examples": 1.5},
     "sft_datasets[0]: max_examples: expected an integer, got a number 1.5"),
    ({"adapter": "alpaca", "path": "P", "name": 3}, "sft_datasets[0]: name: expected a string, got an integer 3"),
    ({"adapter": "vicuna", "path": "P"}, "sft_datasets[0]: adapter must be one of alpaca, dolly, hh_rlhf, "
                                         "messages, chatterbot, auto (got 'vicuna')"),
    ({"adapter": "alpaca", "path": "P", "colums": 1}, "sft_datasets[0]: unknown key(s) colums"),
    ({"adapter": "alpaca", "path": "P", "embedded": "chatterbot-ja"},
     "sft_datasets[0]: give exactly one of dataset, path or embedded"),
    ({"adapter": "alpaca", "path": "data.csv"}, "sft_datasets[0]: data.csv: expected a .jsonl, .json or .parquet"),
    ({"adapter": "alpaca", "path": "missing.jsonl"}, "sft_datasets[0]: data file not found: missing.jsonl"),
    ({"adapter": "hh_rlhf", "embedded": "chatterbot-ja"}, "use adapter chatterbot"),
])
def test_bad_spec_values_name_the_key(tmp_path, spec, message):
    good = jsonl(tmp_path / "ok.jsonl", FUJIKI_ALPACA)
    spec = {k: good if v == "P" else v for k, v in spec.items()}
    with pytest.raises(XltError) as e:
        check_sft_specs([spec])
    assert message in one_line(e)


def test_bad_files_name_the_file_and_line(tmp_path):
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(XltError) as e:
        check_sft_specs([{"adapter": "alpaca", "path": str(latin)}])
    assert one_line(e) == (f"sft_datasets[0]: {latin}:2: not UTF-8 text (byte 0xe9); re-encode the file as UTF-8")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n' * 30 + '{"instruction": \n', encoding="utf-8")
    with pytest.raises(XltError, match=rf"sft_datasets\[0\]: {broken}:31: invalid JSON"):
        check_sft_specs([{"adapter": "alpaca", "path": str(broken)}])  # past the head rows: the whole file parses
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"not parquet\n")
    with pytest.raises(XltError, match=r"sft_datasets\[0\]: .*fake.parquet is not a readable parquet file"):
        check_sft_specs([{"adapter": "auto", "path": str(fake)}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(XltError, match=r"sft_datasets\[0\]: .*empty.jsonl holds no examples"):
        check_sft_specs([{"adapter": "alpaca", "path": str(empty)}])


def test_two_specs_with_one_name_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    specs = [{"adapter": "alpaca", "path": jsonl(tmp_path / d / "train.jsonl", FUJIKI_ALPACA)} for d in "ab"]
    with pytest.raises(XltError, match=r"sft_datasets\[1\]: dataset name 'train.jsonl' is also sft_datasets\[0\]'s"):
        check_sft_specs(specs)
    specs[1]["name"] = "b"
    check_sft_specs(specs)


def test_an_unreachable_hub_dataset_is_one_quick_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(XltError) as e:
        check_sft_specs([{"adapter": "alpaca", "dataset": "fujiki/japanese_alpaca_data", "split": "train"}])
    assert one_line(e).startswith("sft_datasets[0]: cannot read dataset 'fujiki/japanese_alpaca_data': ")
    assert time.time() - t0 < 30
    check_sft_specs([{"adapter": "alpaca", "dataset": "fujiki/japanese_alpaca_data"}], hub=False)  # --offline


def test_a_hub_layout_dataset_folder_is_checked_by_streaming_its_first_rows(tmp_path, monkeypatch):
    """A local ``datasets`` folder (the hub layout: data files in a repository folder) passes the check, offline;
    the same folder with rows of no known layout is one line naming the spec."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    good = tmp_path / "good"
    (good / "data").mkdir(parents=True)
    jsonl(good / "data" / "train.jsonl", FUJIKI_ALPACA)
    check_sft_specs([{"adapter": "alpaca", "dataset": str(good), "split": "train"}])
    check_sft_specs([{"adapter": "auto", "dataset": str(good), "split": "train"}], hub=False)  # --offline reads it too
    bad = tmp_path / "bad"
    (bad / "data").mkdir(parents=True)
    jsonl(bad / "data" / "train.jsonl", [{"foo": "x", "bar": "y"}] * 3)
    with pytest.raises(XltError) as e:
        check_sft_specs([{"adapter": "auto", "dataset": str(bad), "split": "train"}])
    assert one_line(e).startswith("sft_datasets[0]")


def test_a_dataset_emptied_by_filtering_is_one_line(tmp_path):
    hh = jsonl(tmp_path / "hh.jsonl", [r | {"ng_translation": "1"} for r in HH_JA])
    ok = jsonl(tmp_path / "ok.jsonl", FUJIKI_ALPACA)
    with pytest.raises(XltError) as e:
        load_sft_data([{"adapter": "alpaca", "path": ok}, {"adapter": "hh_rlhf", "path": hh, "name": "hh-ja"}])
    assert one_line(e) == ("sft_datasets[1]: hh-ja: no training examples left (rows=3, failed_translation=3); "
                           f"first dropped: {hh}:1: failed_translation")
    with pytest.raises(XltError, match=r"sft_datasets\[0\]: ok.jsonl: no training examples left .*subsampled=2"):
        load_sft_data([{"adapter": "alpaca", "path": ok, "weight": 0.1}])


# ---------------------------------------------------------------------------------------------
# Mixture: duplicates, caps, weights, the held-out split
# ---------------------------------------------------------------------------------------------
def test_duplicates_are_removed_and_counted_where_they_repeat(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", FUJIKI_ALPACA + [FUJIKI_ALPACA[0]])
    # the same example with other whitespace, in another dataset and layout (Dolly's context = Alpaca's input)
    b = jsonl(tmp_path / "b.jsonl", [{"instruction": " 次の文を英語に翻訳してください。\n", "context": "今日は晴れです。 ",
                                      "response": "It is sunny today.\n", "category": "x"},
                                     {"instruction": "新しい質問", "context": "", "response": "新しい答え",
                                      "category": "x"}])
    data = load_sft_data([{"adapter": "alpaca", "path": a}, {"adapter": "dolly", "path": b}])
    assert (data.counts["a.jsonl"]["duplicates"], data.counts["a.jsonl"]["train"]) == (1, 2)
    assert (data.counts["b.jsonl"]["duplicates"], data.counts["b.jsonl"]["train"]) == (1, 1)
    assert len({json.dumps(ex["messages"]) for ex in data.train}) == len(data.train) == 3
    assert all(counts_balance(c) and set(c) == set(SFT_COUNT_KEYS) for c in data.counts.values())


def many(prefix: str, n: int) -> list[dict]:
    return [{"instruction": f"{prefix}の質問{i}", "input": "", "output": f"{prefix}の答え{i}"} for i in range(n)]


def test_max_examples_and_weight(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", many("a", 10))
    data = load_sft_data([{"adapter": "alpaca", "path": a, "max_examples": 4}])
    assert [ex["messages"][0]["content"] for ex in data.train] == [f"aの質問{i}" for i in range(4)]
    assert data.counts["a.jsonl"]["capped"] == 6
    half = load_sft_data([{"adapter": "alpaca", "path": a, "weight": 0.55}], seed=3)
    assert len(half.train) == 6 == len({ex["messages"][0]["content"] for ex in half.train})  # round(5.5): half-up
    assert half.counts["a.jsonl"]["subsampled"] == 4
    more = load_sft_data([{"adapter": "alpaca", "path": a, "weight": 2.5}], seed=3)
    texts = [ex["messages"][0]["content"] for ex in more.train]
    assert len(texts) == 25 and all(texts.count(f"aの質問{i}") in (2, 3) for i in range(10))
    assert sum(texts.count(f"aの質問{i}") == 3 for i in range(10)) == 5
    c = more.counts["a.jsonl"]
    assert (c["train_unique"], c["repeated"], c["train"]) == (10, 15, 25) and counts_balance(c)
    # the sample is seeded: the same seed gives the same examples, another seed others
    again = load_sft_data([{"adapter": "alpaca", "path": a, "weight": 0.55}], seed=3)
    other = load_sft_data([{"adapter": "alpaca", "path": a, "weight": 0.55}], seed=4)
    assert again.train == half.train and other.train != half.train


def test_eval_split_is_disjoint_deterministic_and_taken_before_weighting(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", many("a", 40))
    b = jsonl(tmp_path / "b.jsonl", many("b", 9) + many("a", 3))  # 3 duplicates of a's rows
    specs = [{"adapter": "alpaca", "path": a, "weight": 3.0}, {"adapter": "alpaca", "path": b, "name": "b"}]
    data = load_sft_data(specs, eval_fraction=0.2, seed=7)
    key = lambda ex: json.dumps(ex["messages"], ensure_ascii=False)  # noqa: E731
    train, held = {key(ex) for ex in data.train}, {key(ex) for ex in data.eval}
    assert not train & held
    assert (data.counts["a.jsonl"]["eval"], data.counts["b"]["eval"]) == (8, 2)  # per dataset: 0.2 × 40, 0.2 × 9
    assert data.counts["a.jsonl"]["train"] == 3 * 32 and data.counts["b"]["duplicates"] == 3
    assert sum(ex["source"] == "b" for ex in data.eval) == 2
    assert all(counts_balance(c) for c in data.counts.values())
    assert load_sft_data(specs, eval_fraction=0.2, seed=7) == data
    assert {key(ex) for ex in load_sft_data(specs, eval_fraction=0.2, seed=8).eval} != held
    with pytest.raises(XltError, match=r"eval_fraction=1 must be in \[0, 1\)"):
        load_sft_data(specs, eval_fraction=1)


