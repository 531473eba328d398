"""SFT training side (issue 8): labels as trained, held-out eval loss per epoch, LoRA merged save, packing,
generation config / report generations, ``xlt chat``, and the 2-process launch of the demo recipe.

Tiny random Llama with the embedded (real) SmolLM2 tokenizer; every run is a few optimizer steps.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from xlt.cli import main, run_recipe

DEMO_SFT = REPO / "recipes/smollm2-135m-ja/sft.yaml"


def _recipe(tmp_path: Path, **changes) -> str:
    """The demo SFT recipe with ``changes`` (small data, fresh output dir)."""
    data = yaml.safe_load(DEMO_SFT.read_text(encoding="utf-8"))
    data.update({"output_dir": str(tmp_path / "run"), "logging_steps": 1, "max_length": 256,
                 "sft_datasets": [{"adapter": "chatterbot", "embedded": "chatterbot-ja", "max_examples": 12}]})
    data.update(changes)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return str(path)


def _report(run_dir) -> dict:
    with open(os.path.join(run_dir, "report.json"), encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# Pieces (no training)
# ---------------------------------------------------------------------------------------------
def test_trainer_rows_train_every_assistant_turn_and_its_stop_token_only(tmp_path, embedded_tokenizer):
    """The data phase the trainer runs: adapters -> held-out split -> rendered rows; a multi-turn dialogue keeps
    loss on both answers (and EOS after each), nowhere else; counts add up per dataset."""
    from xlt.config import SftArguments
    from xlt.data.sft import counts_balance
    from xlt.train.sft import IGNORE, _sft_datasets

    tok = embedded_tokenizer
    turns = [{"role": "user", "content": "日本の首都は？"}, {"role": "assistant", "content": "東京です。"},
             {"role": "user", "content": "人口は？"}, {"role": "assistant", "content": "約1400万人です。"}]
    path = tmp_path / "dialogues.jsonl"
    path.write_text("".join(json.dumps({"messages": turns[:2 + 2 * (i % 2)] + [
        {"role": "user", "content": f"質問{i}"}, {"role": "assistant", "content": f"答え{i}"}]},
        ensure_ascii=False) + "\n" for i in range(8)), encoding="utf-8")
    args = SftArguments(sft_datasets=[{"adapter": "auto", "path": str(path), "name": "d"}], eval_fraction=0.25)
    train, evals, counts = _sft_datasets(args, tok, 512)
    assert len(train) == 6 and len(evals) == 2
    c = counts["d"]
    assert counts_balance(c) and c["train_rows"] == 6 and c["eval_rows"] == 2 and c["fully_masked"] == 0
    for row in train + evals:
        trained = [t if lab != IGNORE else None for t, lab in zip(row["input_ids"], row["labels"])]
        pieces, cur = [], []
        for t in trained + [None]:
            if t is None and cur:
                pieces.append(tok.decode(cur))
                cur = []
            elif t is not None:
                cur.append(t)
        answers = [p.removesuffix(tok.eos_token) for p in pieces]
        assert all(p.endswith(tok.eos_token) for p in pieces)
        answers = [a.strip() for a in answers]
        assert answers[0] == "東京です。" and answers[-1].startswith("答え") and len(answers) in (2, 3)
        assert len(answers) == 2 or answers[1] == "約1400万人です。"


def test_learning_rate_default_only_when_the_recipe_sets_none(tmp_path):
    from types import SimpleNamespace

    from xlt.train.sft import learning_rate_given, resolve_learning_rate

    unset = _recipe(tmp_path)
    data = yaml.safe_load(Path(unset).read_text(encoding="utf-8"))
    data.pop("learning_rate")
    Path(unset).write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    assert not learning_rate_given(["--config", unset])
    assert learning_rate_given(["--config", unset, "--learning_rate", "2e-5"])  # 2e-5 is SFTConfig's default
    assert learning_rate_given(["--config", _recipe(tmp_path / "b")])  # the demo recipe sets 5e-5
    args = SimpleNamespace(learning_rate=2e-5)
    assert resolve_learning_rate(args, True, False) == 2e-4
    assert resolve_learning_rate(args, False, False) == 2e-5
    args.learning_rate = 7e-6
    assert resolve_learning_rate(args, True, True) == 7e-6


def test_eval_losses_come_from_the_log_history():
    from xlt.train.sft import eval_losses

    hist = [{"loss": 3.0, "epoch": 0.5}, {"eval_loss": 2.5, "epoch": 1.0}, {"loss": 2.0, "epoch": 1.5},
            {"eval_loss": 2.25, "epoch": 2.0}]
    assert eval_losses(hist) == [{"epoch": 1.0, "eval_loss": 2.5}, {"epoch": 2.0, "eval_loss": 2.25}]


def test_sft_trainer_trains_our_labels_as_given_and_pads_them_with_ignore(tmp_path, tiny_model_dir,
                                                                         embedded_tokenizer):
    """TRL must neither rebuild nor drop the labels (the EOS is trained although pad == eos), and padding is -100."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from xlt.train.sft import IGNORE, build_sft_trainer

    tok = embedded_tokenizer
    eos = tok.eos_token_id
    rows = [{"input_ids": [5, 6, 7, 8, eos], "labels": [IGNORE, IGNORE, 7, 8, eos]},
            {"input_ids": [9, 10, eos], "labels": [IGNORE, 10, eos]}]
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_length=64, use_cpu=True,
                     report_to="none", bf16=False, shuffle_dataset=False)
    trainer = build_sft_trainer(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok, args, rows, rows[:1])
    assert trainer.train_dataset["labels"] == [r["labels"] for r in rows]
    assert trainer.args.eval_strategy == "epoch"
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 7, 8, eos], [IGNORE, 10, eos, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


# ---------------------------------------------------------------------------------------------
# Bad input: one line, before any model loads
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes,expected", [
    ({"use_lora": True, "lora_target_modules": "q_proj,nope_proj"},
     "lora_target_modules: no linear layer named nope_proj in LlamaForCausalLM"),
    ({"eval_fraction": 1.0}, "eval_fraction=1.0: expected a number in [0, 1)"),
    ({"lora_r": 0}, "lora_r: expected a positive integer"),
    ({"chat_template": "alpaca"}, "chat_template='alpaca': expected null"),
    ({"chat_template": "chatml"}, "chat_template='chatml' needs prompt_format: chat"),
    ({"packing": True, "packing_strategy": "wrapped"}, "packing_strategy=wrapped cuts examples across rows"),
])
def test_bad_sft_input_is_one_line_before_the_model_loads(tmp_path, capsys, tiny_model_dir, no_model_loading,
                                                          changes, expected):
    rc = main(["sft", "--config", _recipe(tmp_path, model=tiny_model_dir, **changes)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err and err[-1].startswith("xlt: error: ") and expected in err[-1], err
    assert not any("Traceback" in line for line in err)


# ---------------------------------------------------------------------------------------------
# A LoRA + packing + held-out run in process; xlt chat on its model
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("sft-lora")
    recipe = _recipe(tmp, model=tiny_model_dir, use_lora=True, lora_r=4, lora_alpha=8,
                     lora_target_modules="q_proj,v_proj", packing=True, eval_fraction=0.25, num_train_epochs=2,
                     per_device_train_batch_size=4)
    data = yaml.safe_load(Path(recipe).read_text(encoding="utf-8"))
    data.pop("learning_rate")  # the LoRA default applies
    Path(recipe).write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    import transformers

    import xlt.train.sft

    seen: dict = {"rows": None, "batches": []}  # xlt's tokenized examples, and every batch the trainer trained on
    real_rows, real_step = xlt.train.sft._sft_datasets, transformers.Trainer.training_step

    def rows(*args, **kwargs):
        seen["rows"] = real_rows(*args, **kwargs)
        return seen["rows"]

    def step(self, model, inputs, *args, **kwargs):
        seen["batches"].append({k: v.detach().clone() for k, v in inputs.items() if k in ("input_ids", "position_ids")})
        return real_step(self, model, inputs, *args, **kwargs)

    import contextlib

    log = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(log):
        mp.setattr(xlt.train.sft, "_sft_datasets", rows)
        mp.setattr(transformers.Trainer, "training_step", step)
        assert run_recipe("sft", ["--config", recipe]) == 0
    seen["log"] = log.getvalue()
    lora_run_seen[str(tmp / "run")] = seen
    return tmp / "run"


lora_run_seen: dict = {}


def test_the_log_counts_every_dataset_as_the_report_does(lora_run):
    """README: the counts (rows read, duplicates, capped, held out, cut, ...) are in the log and in report.json."""
    counts = _report(lora_run)["sft"]["counts"]
    logged = {}
    for line in lora_run_seen[str(lora_run)]["log"].splitlines():
        name, _, rest = line.removeprefix("[xlt sft] ").partition(": ")
        if name in counts and rest:
            logged[name] = {k: int(v) for k, v in (item.rsplit(" ", 1) for item in rest.split(", "))}
    assert logged == counts and counts["chatterbot-ja"]["capped"] > 0


def test_packing_never_cuts_an_example_across_rows(lora_run):
    """packing: true (TRL's padding-free bfd): every packed segment the trainer trained on (position_ids restart at
    0) is one whole tokenized example, and over an epoch every example is trained whole, once."""
    seen = lora_run_seen[str(lora_run)]
    train = [tuple(r["input_ids"]) for r in seen["rows"][0]]
    segments = []
    for b in seen["batches"]:
        for ids, pos in zip(b["input_ids"].tolist(), b["position_ids"].tolist()):
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            segments += [tuple(ids[a:z]) for a, z in zip(starts, starts[1:])]
    assert segments and all(seg in train for seg in segments), "a packed segment is not a whole example"
    epochs = 2
    assert sorted(segments) == sorted(train * epochs)


def test_lora_sft_reports_eval_loss_per_epoch_counts_and_saves_merged(lora_run, tiny_model_dir):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    sft = _report(lora_run)["sft"]
    assert sft["mode"] == "lora" and sft["learning_rate"] == 2e-4 and sft["packing"] is True
    assert [e["epoch"] for e in sft["eval_loss"]] == [1.0, 2.0] and all(e["eval_loss"] > 0 for e in sft["eval_loss"])
    c = sft["counts"]["chatterbot-ja"]
    assert c["train"] + c["eval"] == 12 and c["capped"] > 0 and c["fully_masked"] == 0  # max_examples: 12
    assert c["eval"] == 3 and sft["train_examples"] == c["train_rows"] == 9 and sft["eval_examples"] == 3
    # Merged: a plain model folder (no adapter files) that the Auto classes load; q_proj changed, k_proj not.
    files = set(os.listdir(lora_run / "sft"))
    assert "model.safetensors" in files and not any(f.startswith("adapter_") for f in files)
    model = AutoModelForCausalLM.from_pretrained(lora_run / "sft")
    assert type(model).__name__ == "LlamaForCausalLM"
    base, tuned = load_file(Path(tiny_model_dir) / "model.safetensors"), load_file(lora_run / "sft/model.safetensors")
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    assert not torch.equal(base[q], tuned[q]) and torch.equal(base[k], tuned[k])


def test_generation_config_stops_at_the_format_stop_token_and_report_has_generations(lora_run,
                                                                                      embedded_tokenizer):
    from xlt.train.sft import GENERATION_INSTRUCTIONS

    gen = json.loads((lora_run / "sft/generation_config.json").read_text(encoding="utf-8"))
    info = json.loads((lora_run / "sft/xlt_sft.json").read_text(encoding="utf-8"))
    assert gen["eos_token_id"] == embedded_tokenizer.eos_token_id
    assert info["prompt_format"] == "stablelm_alpaca" and info["stop_token_ids"] == [embedded_tokenizer.eos_token_id]
    gens = _report(lora_run)["sft"]["generations"]
    assert [g["instruction"] for g in gens] == list(GENERATION_INSTRUCTIONS)
    assert all(isinstance(g["output"], str) and 0 <= g["tokens"] <= 48 for g in gens)


def test_rerun_of_a_complete_run_does_nothing(lora_run):
    stamp = os.path.getmtime(lora_run / "sft/model.safetensors")
    cfg = str(lora_run.parent / "sft.yaml")
    assert run_recipe("sft", ["--config", cfg]) == 0
    assert os.path.getmtime(lora_run / "sft/model.safetensors") == stamp


def test_chat_streams_in_the_training_format_and_stops_at_the_stop_token(lora_run, tmp_path):
    """The answer streamed by chat is the greedy continuation of the training-format prompt, and it ends where
    the model folder's generation_config puts the stop token. A random model never picks EOS by itself, so the
    stop token is then set to the first token it generates greedily: the answer must come out empty."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xlt.eval.chat import chat
    from xlt.train.sft import prompt_ids

    model_dir = tmp_path / "sft"
    shutil.copytree(lora_run / "sft", model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    question = "日本の首都はどこですか？"
    ids = prompt_ids(question, "stablelm_alpaca", tok)
    with torch.no_grad():
        free = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(ids):].tolist()
    assert tok.eos_token_id not in free

    def answer() -> str:
        out = io.StringIO()
        assert chat(str(model_dir), max_new_tokens=6, stdin=io.StringIO(question + "\n\n"), stdout=out) == 1
        return out.getvalue().split("> ")[1].removesuffix("\n")

    assert answer() == tok.decode(free, skip_special_tokens=True) != ""
    gen = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
    gen["eos_token_id"] = free[0]
    (model_dir / "generation_config.json").write_text(json.dumps(gen), encoding="utf-8")
    assert answer() == ""


def test_chat_cli_pipes_stdin_and_refuses_a_folder_without_xlt_sft_json(lora_run, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "xlt.cli", "chat", "--model", str(lora_run / "sft"),
                           "--max-new-tokens", "4"], input="こんにちは\n元気ですか\n", capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("> ") == 3  # two answers, then the prompt that reads end of input
    proc = subprocess.run([sys.executable, "-m", "xlt.cli", "chat", "--model", str(tmp_path)], input="",
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "xlt_sft.json not found" in proc.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# chat_template: chatml, the whole run on a base model whose tokenizer has no ChatML tokens
# ---------------------------------------------------------------------------------------------
CHATML_DIALOGUES = [[{"role": "system", "content": f"あなたは案内係{i}です。"},
                     {"role": "user", "content": f"{city}はどこですか？"},
                     {"role": "assistant", "content": f"{city}は日本にあります。"},
                     {"role": "user", "content": "有名なものは？"},
                     {"role": "assistant", "content": f"{food}が有名です。"}]
                    for i, (city, food) in enumerate([("東京", "寿司"), ("大阪", "たこ焼き"), ("京都", "抹茶"),
                                                      ("札幌", "ラーメン"), ("福岡", "明太子"), ("仙台", "牛タン"),
                                                      ("名古屋", "味噌カツ"), ("広島", "お好み焼き")])]


def _chatml_free_model_dir(path: Path) -> Path:
    """A tiny untied Llama with a byte-level BPE trained on the dialogues: ``<s>`` BOS prepended, ``</s>`` EOS, no
    ``<|im_start|>`` / ``<|im_end|>`` (a base model before ChatML)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import tiny_llama

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([t["content"] for d in CHATML_DIALOGUES for t in d] * 4,
                            trainers.BpeTrainer(vocab_size=500, special_tokens=["<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    model = tiny_llama(len(tok), tie=False)
    model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_chatml_sft_run_trains_chatml_rows_and_saves_a_model_that_generates_with_it(tmp_path):
    """README: ``chat_template: chatml`` installs ChatML. The real SFT path on a base model without the ChatML
    tokens: the saved tokenizer carries the template and <|im_end|> as EOS (two new rows in the model); every row
    trained is a dialogue rendered as ChatML (written out here by hand) after one BOS, with loss on each assistant
    answer and its <|im_end|> only; the saved model loads and generates from the ChatML prompt, stopping there."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xlt.data.sft_format import CHATML_TEMPLATE
    from xlt.train.sft import IGNORE, prompt_ids

    base = _chatml_free_model_dir(tmp_path / "base")
    base_tok = AutoTokenizer.from_pretrained(base)
    assert "<|im_end|>" not in base_tok.get_vocab()
    data = tmp_path / "dialogues.jsonl"
    data.write_text("".join(json.dumps({"messages": d}, ensure_ascii=False) + "\n" for d in CHATML_DIALOGUES),
                    encoding="utf-8")
    recipe = _recipe(tmp_path, model=str(base), prompt_format="chat", chat_template="chatml", eval_fraction=0.25,
                     num_train_epochs=1, per_device_train_batch_size=3, learning_rate=1e-3,
                     sft_datasets=[{"adapter": "messages", "path": str(data), "name": "d"}])
    batches = []
    real_step = transformers.Trainer.training_step

    def step(self, model, inputs, *args, **kwargs):
        batches.append({k: inputs[k].detach().clone() for k in ("input_ids", "labels", "attention_mask")})
        return real_step(self, model, inputs, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers.Trainer, "training_step", step)
        assert run_recipe("sft", ["--config", recipe]) == 0

    sft_dir = tmp_path / "run/sft"
    tok = AutoTokenizer.from_pretrained(sft_dir)
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.chat_template == CHATML_TEMPLATE and tok.eos_token == "<|im_end|>" and tok.pad_token == "</s>"
    assert sorted([im_start, im_end]) == [len(base_tok), len(base_tok) + 1] and len(tok) == len(base_tok) + 2
    model = AutoModelForCausalLM.from_pretrained(sft_dir)
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == len(tok)

    def chatml(turns) -> str:  # ChatML written out by hand
        return "".join(f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>\n" for t in turns)

    rendered = {chatml(d): d for d in CHATML_DIALOGUES}
    seen = []
    for b in batches:
        for ids, labels, mask in zip(b["input_ids"].tolist(), b["labels"].tolist(), b["attention_mask"].tolist()):
            ids, labels = ids[:sum(mask)], labels[:sum(mask)]
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
            text = tok.decode(ids[1:])
            assert text in rendered, text
            seen.append(text)
            assert all(lab in (IGNORE, i) for lab, i in zip(labels, ids))
            runs, cur = [], []
            for lab in labels + [IGNORE]:
                if lab != IGNORE:
                    cur.append(lab)
                elif cur:
                    runs.append(tok.decode(cur))
                    cur = []
            assert runs == [t["content"] + "<|im_end|>" for t in rendered[text] if t["role"] == "assistant"]
    report = _report(tmp_path / "run")["sft"]
    assert len(seen) == len(set(seen)) == report["train_examples"] == 6  # every train row once, 2 held out
    assert report["chat_template"] == "chatml" and report["stop_token_ids"] == [im_end]
    info = json.loads((sft_dir / "xlt_sft.json").read_text(encoding="utf-8"))
    assert info["chat_template"] == "chatml" and info["stop_token_ids"] == [im_end]
    assert model.generation_config.eos_token_id == im_end

    ids = prompt_ids("東京はどこですか？", "chat", tok)
    assert tok.decode(ids) == "<s>" + chatml([{"role": "user", "content": "東京はどこですか？"}]) + \
        "<|im_start|>assistant\n"
    with torch.no_grad():
        new = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    # the saved generation config stops at <|im_end|>: it ends there, or runs to the limit without one
    assert (im_end in new and new.index(im_end) == len(new) - 1) or (im_end not in new and len(new) == 12)
    assert len(report["generations"]) == 3


# ---------------------------------------------------------------------------------------------
# Done when: the demo recipe under a 2-process launch; the model reloads and generates
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_recipe_under_two_process_launch_reloads_and_generates(tmp_path, tiny_model_dir, embedded_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate)] if accelerate.is_file() else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
    cmd += ["launch", "--config_file", str(REPO / "accelerate_configs/cpu_multi.yaml"), "--main_process_port",
            str(_free_port()), str(REPO / "recipes/sft.py"), "--config", str(DEMO_SFT),
            # the machine (no GPU) and the size of a test run; every other key as shipped
            "--use_cpu", "true", "--model", tiny_model_dir, "--output_dir", str(tmp_path / "run"),
            "--num_train_epochs", "1", "--per_device_train_batch_size", "16", "--max_length", "192"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "eval loss" in proc.stdout

    sft = _report(tmp_path / "run")["sft"]
    assert sft["world_size"] == 2 and sft["replicas_in_sync"] is True and sft["steps"] > 0
    assert len(sft["eval_loss"]) == 1 and sft["eval_loss"][0]["epoch"] == 1.0
    c = sft["counts"]["chatterbot-ja"]
    from xlt.data.sft import counts_balance

    assert counts_balance(c) and c["train"] + c["eval"] == 128 and c["capped"] == c["rows"] - 128 - c["duplicates"] \
        - c["empty"] - c["malformed"] - c["failed_translation"]  # max_examples: 128, every other row counted
    assert c["eval"] == round(128 * 0.1) and c["train_rows"] == c["train"] - c["train_fully_masked"] > 0
    assert len(sft["generations"]) == 3

    model_dir = tmp_path / "run/sft"
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    eos = embedded_tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == eos  # the format's stop token
    ids = tok("以下は、タスクを説明する指示です。\n\n### 指示: \n日本の首都は？\n\n### 応答: ", return_tensors="pt").input_ids
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    # generation uses the saved config: it ends at the first stop token, or runs to the limit without one
    assert (eos in new and new.index(eos) == len(new) - 1) or (eos not in new and len(new) == 12)
