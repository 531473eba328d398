"""``xlt push``: token and write access checked before anything is uploaded, nothing written into RUN_DIR,
the dry-run folder is exactly the upload and reloads with the Auto classes, the card names every item."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from xlt.cli import main

SECRET = "hf_SECRETtokenDoNotPrint123"


def _tree_hash(root: str) -> dict[str, str]:
    out = {}
    for r, _, names in os.walk(root):
        for n in names:
            p = os.path.join(r, n)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir) -> str:
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "sft")
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "tokenizer_report.json").write_text(json.dumps(
        {"mode": "extend", "init": "subword_mean", "new_tokens": 1024,
         "vocab_size": {"base": 48128, "extended": 49152}}))
    (run / "xlt_run.json").write_text(json.dumps({
        "cpt": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "tokenizer_mode": "extend", "seq_len": 256,
                "ja_schedule": "linear", "ja_ratio_start": 0.5, "ja_ratio_end": 0.8, "slw_min_len": 64,
                "slw_fraction": 0.2, "learning_rate": 0.0001, "lr_scheduler_type": "cosine",
                "sources": [{"name": "hironsan", "lang": "ja", "embedded": "hironsan", "domain": "news"},
                            {"name": "wiki-ja", "lang": "ja", "dataset": "example/wiki-ja", "domain": "wiki"}]},
        "sft": {"learning_rate": 5e-05, "sft_datasets": [{"adapter": "chatterbot", "embedded": "chatterbot-ja"}]}}))
    (run / "report.json").write_text(json.dumps({
        "cpt": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "steps": 48, "tokens_per_step": 1024,
                "train_loss": 3.2, "accounting": {"tokens_by_source": {"hironsan": 20000, "wiki-ja": 10000}}},
        "tokens_trained": {"ja": 30000, "en": 19152},
        "tokenizer": {"ja_chars_per_token": {"base": 0.5651, "extended": 1.2345},
                      "en_chars_per_token": {"base": 3.6496, "extended": 3.6496}, "new_tokens": 1024},
        "bpc": {"ja": {"base": 6.5, "cpt": 4.1}}, "mc": {"cpt": {"accuracy": 0.375, "n": 8}},
        "generation": {"prompt": "日本の首都は？", "output": "東京です。"}}), encoding="utf-8")
    return str(run)


@pytest.fixture
def no_upload(monkeypatch):
    """Any call that would create or upload on the Hub fails the test."""
    from huggingface_hub import HfApi

    def forbidden(*a, **k):
        raise AssertionError("the Hub was written to")

    for name in ("create_repo", "upload_folder", "create_commit", "upload_file"):
        monkeypatch.setattr(HfApi, name, forbidden)


def _token(monkeypatch, token, whoami=None):
    import huggingface_hub
    from huggingface_hub import HfApi

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
    if whoami is not None:
        monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: whoami() if callable(whoami) else whoami)


def test_dry_run_output_is_the_upload_folder_and_reloads(run_dir, tmp_path, capsys, no_upload):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before = _tree_hash(run_dir)
    out = str(tmp_path / "upload")
    assert main(["push", run_dir, "--repo-id", "me/smollm2-ja", "--dry-run", "--output", out]) == 0
    assert out in capsys.readouterr().out
    assert _tree_hash(run_dir) == before  # RUN_DIR untouched (the old dry run wrote sft/README.md)
    names = set(_tree_hash(out))
    assert {"README.md", "REPORT.md", "report.json", "config.json", "generation_config.json", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json", "plots/bpc.png", "plots/tokenizer.png"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)

    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    for heading in ("Base model", "Tokenizer change", "Data sources and curriculum", "Tokens per language",
                    "Hyper-parameters", "Evaluation results", "Data licences", "Intended use and limits",
                    "How to load"):
        assert f"## {heading}" in card
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "base 48128 -> extended 49152" in card and "base 0.5651 -> extended 1.2345" in card
    assert "linear schedule from 0.5 to 0.8" in card and "SFT data: chatterbot-ja" in card
    assert "49,152" in card and "hironsan 20,000" in card and "learning_rate 0.0001" in card
    assert "6.5000" in card and "cpt 0.375" in card
    assert "hironsancorpus, MIT" in card and "https://huggingface.co/datasets/example/wiki-ja" in card
    assert 'AutoModelForCausalLM.from_pretrained("me/smollm2-ja")' in card


def test_dry_run_refuses_an_output_inside_the_run_or_not_empty(run_dir, capsys, no_upload):
    assert main(["push", run_dir, "--repo-id", "me/x", "--dry-run", "--output", os.path.join(run_dir, "up")]) == 2
    assert "inside the run directory" in capsys.readouterr().err
    assert main(["push", run_dir, "--repo-id", "me/x", "--dry-run", "--output", os.path.join(run_dir, "sft")]) == 2
    assert not os.path.exists(os.path.join(run_dir, "up"))


def test_old_form_still_works_and_writes_nothing_into_the_model(run_dir, capsys, no_upload):
    before = _tree_hash(run_dir)
    assert main(["push", "--model", os.path.join(run_dir, "sft"), "--repo", "me/x", "--dry-run"]) == 0
    staged = capsys.readouterr().out.strip().split(": ")[-1]
    assert os.path.isfile(os.path.join(staged, "README.md")) and not staged.startswith(run_dir)
    assert _tree_hash(run_dir) == before
    shutil.rmtree(staged)


@pytest.mark.parametrize("case", ["missing", "read", "rejected", "other_org", "fine_grained_read"])
def test_bad_tokens_are_one_line_and_upload_nothing(run_dir, monkeypatch, capsys, no_upload, case):
    def rejected():
        raise RuntimeError(f"401 Unauthorized for token {SECRET}")

    whoami = {"missing": None, "rejected": rejected,
              "read": {"name": "me", "auth": {"accessToken": {"role": "read"}}},
              "other_org": {"name": "me", "orgs": [{"name": "acme", "roleInOrg": "read"}],
                            "auth": {"accessToken": {"role": "write"}}},
              "fine_grained_read": {"name": "me", "auth": {"accessToken": {"role": "fineGrained", "fineGrained": {
                  "scoped": [{"entity": {"type": "user", "name": "me"}, "permissions": ["repo.content.read"]}]}}}},
              }[case]
    _token(monkeypatch, None if case == "missing" else SECRET, whoami)
    repo = "acme/x" if case == "other_org" else "me/x"
    before = _tree_hash(run_dir)
    assert main(["push", run_dir, "--repo-id", repo]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert err.startswith("xlt: error: push:") and "\n" not in err and "nothing uploaded" in err
    assert SECRET not in cap.out + cap.err
    assert _tree_hash(run_dir) == before


def test_write_token_uploads_the_staged_folder(run_dir, monkeypatch, capsys, tmp_path):
    from huggingface_hub import HfApi

    _token(monkeypatch, SECRET, {"name": "me", "auth": {"accessToken": {"role": "fineGrained", "fineGrained": {
        "scoped": [{"entity": {"type": "user", "name": "me"}, "permissions": ["repo.content.read", "repo.write"]}]}}}})
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **k: calls.append(("create", repo_id, k)))

    def upload_folder(self, folder_path, repo_id, **k):
        calls.append(("upload", repo_id, sorted(_tree_hash(folder_path))))
        assert not os.path.abspath(folder_path).startswith(os.path.abspath(run_dir))
        with open(os.path.join(folder_path, "model.safetensors"), "rb") as f:  # links resolve to the weights
            assert f.read(8)

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    before = _tree_hash(run_dir)
    assert main(["push", run_dir, "--repo-id", "me/x", "--private"]) == 0
    cap = capsys.readouterr()
    assert "https://huggingface.co/me/x" in cap.out and SECRET not in cap.out + cap.err
    assert [c[0] for c in calls] == ["create", "upload"] and calls[0][2]["private"] is True
    out = str(tmp_path / "dry")
    assert main(["push", run_dir, "--repo-id", "me/x", "--dry-run", "--output", out]) == 0
    assert calls[1][2] == sorted(_tree_hash(out))  # the dry run shows exactly what is uploaded
    assert _tree_hash(run_dir) == before


def test_recipe_push_to_hub_is_checked_before_any_work(tmp_path, monkeypatch, capsys, no_upload):
    import xlt.eval.suite as suite
    from conftest import REPO
    from xlt.cli import run_recipe

    monkeypatch.setattr(suite, "evaluate_run", lambda *a, **k: pytest.fail("evaluation ran"))
    cfg = str(REPO / "recipes/smollm2-135m-ja/evaluate.yaml")
    out = str(tmp_path / "run")
    assert run_recipe("evaluate", ["--config", cfg, "--output_dir", out, "--push_to_hub", "true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "xlt: error: push_to_hub: true needs hub_repo_id (ORG/NAME)"
    _token(monkeypatch, SECRET, {"name": "me", "auth": {"accessToken": {"role": "read"}}})
    assert run_recipe("evaluate", ["--config", cfg, "--output_dir", out, "--push_to_hub", "true",
                                   "--hub_repo_id", "me/x"]) == 2
    cap = capsys.readouterr()
    assert "cannot write" in cap.err and SECRET not in cap.err + cap.out
