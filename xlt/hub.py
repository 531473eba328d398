"""Model card and push to the Hugging Face Hub (safetensors, tokenizer, README.md)."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from xlt.config import XltError
from xlt.report import format_table

UPLOAD_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer*", "README.md", "*.txt"]


def model_card(repo: str, report: dict[str, Any]) -> str:
    """A model card with the figures of ``report.json``: data, tokens, tokenizer, bits per character."""
    cpt = report.get("cpt", {})
    sft = report.get("sft", {})
    base = cpt.get("model", "unknown")
    trained = report.get("tokens_trained", {})
    lines = [
        "---",
        "language: [ja, en]",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [xlt, continued-pretraining, japanese]",
        "---",
        f"# {repo.split('/')[-1]}",
        "",
        f"Japanese continued pretraining of `{base}` with [xlt](https://pypi.org/project/xlt/)"
        + (", then instruction SFT." if sft else "."),
        "",
        "## Training",
        f"- Tokens trained: {sum(trained.values()):,} ("
        + ", ".join(f"{k} {v:,}" for k, v in trained.items()) + ")" if trained else "- Tokens trained: n/a",
        f"- Steps: {cpt.get('steps', 'n/a')}, tokens per step: {cpt.get('tokens_per_step', 'n/a')}, "
        f"final train loss: {cpt.get('train_loss', 'n/a')}",
    ]
    if sft:
        lines.append(f"- SFT: {sft.get('examples')} examples x {sft.get('epochs')} epochs, "
                     f"prompt format `{sft.get('prompt_format')}`, final loss {sft.get('train_loss')}")
    lines += ["", "## Results (held-out text; bits per character are comparable across tokenizers)", "",
              "```", format_table(report), "```", ""]
    gen = report.get("generation")
    if gen:
        lines += ["## Sample", "", f"> {gen['prompt']}", "", gen["output"], ""]
    lines += ["## Limitations", "", "Trained on the data listed above only; outputs may be wrong or biased.", ""]
    return "\n".join(lines)


def push(model_dir: str, repo: str, report_path: Optional[str] = None, private: bool = False,
         dry_run: bool = False) -> str:
    """Write ``README.md`` into ``model_dir`` and upload the folder; returns the repo URL (or the card path)."""
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise XltError(f"--model: {model_dir} holds no config.json")
    if any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in os.listdir(model_dir)):
        raise XltError(f"--model: {model_dir} holds pickle weights; only safetensors are pushed")
    report_path = report_path or os.path.join(os.path.dirname(os.path.abspath(model_dir)), "report.json")
    report = {}
    if os.path.isfile(report_path):
        with open(report_path, encoding="utf-8") as f:
            report = json.load(f)
    card = os.path.join(model_dir, "README.md")
    with open(card, "w", encoding="utf-8") as f:
        f.write(model_card(repo, report))
    if dry_run:
        return card
    from huggingface_hub import HfApi

    api = HfApi()  # the token comes from HF_TOKEN or the login cache; it is never printed
    api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=model_dir, repo_id=repo, repo_type="model", allow_patterns=UPLOAD_PATTERNS,
                      commit_message="Upload with xlt")
    return f"https://huggingface.co/{repo}"
