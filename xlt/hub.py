"""Model card and push to the Hugging Face Hub (safetensors, tokenizer, generation config, REPORT.md, card).

Guarantees of :func:`push_run`:
- the token and its write access to the target namespace are checked (``HfApi.whoami``) before anything is
  created or uploaded; a missing, invalid or read-only token is one ``XltError`` line, and the token itself
  is never printed or put into a message;
- nothing is written into the run directory: the upload folder (model files, README.md card, REPORT.md with
  ``plots/``, report.json) is staged in a temporary folder, or in ``output`` for ``dry_run``, which then holds
  exactly what would be uploaded.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import tempfile
from typing import Any, Optional

from xlt.config import XltError
from xlt.report import REPORT_MD, build_report, format_table, mt_bench_markdown

UPLOAD_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                   "tokenizer*", "special_tokens_map.json", "added_tokens.json", "*.jinja", "*.model", "*.txt",
                   "vocab.json", "merges.txt", "preprocessor_config.json"]
_PICKLES = (".bin", ".pt", ".pth", ".pkl")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WRITE_ROLES = ("write", "admin")
ORG_WRITE_ROLES = ("write", "admin", "contributor")


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _licence(src: dict[str, Any]) -> str:
    """The licence line of one data source (embedded corpora carry theirs; others point at their origin)."""
    if src.get("embedded"):
        from xlt.embedded import EMBEDDED_CORPORA

        return EMBEDDED_CORPORA.get(src["embedded"], ("", f"embedded corpus {src['embedded']}"))[1]
    if src.get("dataset"):
        return f"see the dataset card https://huggingface.co/datasets/{src['dataset']}"
    return "local file: the licence its owner gives"


def _source_line(src: dict[str, Any]) -> str:
    where = (f"embedded `{src['embedded']}`" if src.get("embedded") else
             f"hub dataset `{src['dataset']}`" + (f" ({src['config']})" if src.get("config") else "")
             if src.get("dataset") else f"local file `{os.path.basename(str(src.get('path', '?')))}`")
    return f"- `{src.get('name')}` ({src.get('lang')}, {src.get('domain', 'general')}): {where}; licence: {_licence(src)}"


def _cpt_line(cpt: dict[str, Any]) -> list[str]:
    """The continued-pretraining figures that were recorded (steps, tokens per step, loss, mode)."""
    parts = []
    if cpt.get("steps") is not None:
        parts.append(f"{cpt['steps']} steps" + (f" x {cpt['tokens_per_step']} tokens per step"
                                               if cpt.get("tokens_per_step") is not None else ""))
    parts += [f"{name} {cpt[key]}" for key, name in (("train_loss", "final train loss"), ("mode", "mode"))
              if cpt.get(key) is not None]
    return ["- Continued pretraining: " + ", ".join(parts)] if parts else []


def _ja_chars_per_token(report: dict[str, Any], facts: dict[str, Any]) -> list[str]:
    """The model's tokenizer on Japanese text: the evaluate stage's count on the run's held-out Japanese text
    (``eval.detail``, final stage), else what :func:`tokenizer_facts` measured on that text at push time."""
    detail = (report.get("eval") or {}).get("detail") or {}
    stage = next((s for s in ("sft", "cpt") if f"{s}/ja" in detail), None)
    measured = detail.get(f"{stage}/ja") if stage else facts.get("ja")
    if not measured or not measured.get("tokens"):
        return []
    line = (f"- Japanese characters per token: {measured['chars'] / measured['tokens']:.3f} "
            f"({measured['chars']:,} characters of the run's held-out Japanese text in {measured['tokens']:,} "
            "tokens of this model's tokenizer: its cost on Japanese text)")
    base = detail.get("base/ja")
    if stage and base and base.get("tokens") and base["tokens"] != measured["tokens"]:
        line += f"; the base model's tokenizer: {base['chars'] / base['tokens']:.3f}"
    return [line]


def _tokenizer_lines(report: dict[str, Any], rc: dict[str, Any], tokr: dict[str, Any],
                     facts: dict[str, Any]) -> list[str]:
    """The Tokenizer section: the kept tokenizer, or the change (mode, new tokens, embedding init, vocabulary
    sizes, the tokenizer stage's characters per token); then Japanese characters per token of this model."""
    tok = report.get("tokenizer") or {}
    mode = tokr.get("mode") or tok.get("mode") or rc.get("tokenizer_mode")
    lines = ["## Tokenizer change", ""]
    vocab = facts.get("vocab_size")
    if mode == "none":
        lines.append("- The base model's tokenizer, kept unchanged (`tokenizer_mode: none`)"
                     + (f": {vocab:,} tokens" if vocab else ""))
    elif mode:
        new = tok.get("new_tokens", tokr.get("new_tokens"))
        init = tokr.get("init") or rc.get("embedding_init")
        lines.append("- " + "; ".join([f"Mode: {mode}"] + ([f"new tokens: {new:,}"] if new is not None else [])
                                      + ([f"embedding init: {init}"] if init else [])))
        vs = tokr.get("vocab_size") or {}
        if vs.get("base") and vs.get("extended"):
            lines.append(f"- Vocabulary size: base {vs['base']} -> extended {vs['extended']}")
        elif vocab:
            lines.append(f"- Vocabulary size: {vocab:,}")
        for lang in ("ja", "en"):
            c = tok.get(f"{lang}_chars_per_token") or {}
            if c.get("base") is not None and c.get("extended") is not None:
                lines.append(f"- {lang} characters per token on the tokenizer stage's sample: base {c['base']} "
                             f"-> extended {c['extended']}")
    elif vocab:
        lines.append(f"- Vocabulary size: {vocab:,}")
    return lines + _ja_chars_per_token(report, facts) + [""]


def _speed_lines(speed: dict[str, Any]) -> list[str]:
    """Generation speed of the final stage the evaluate stage timed (greedy, one prompt at a time), with the
    base model's for comparison."""
    def figures(s: dict[str, Any]) -> str:
        parts = [f"{s['tokens_per_second']:.1f} tokens/s"] if "tokens_per_second" in s else []
        parts += [f"{s['chars_per_second']:.1f} Japanese characters/s"] if "chars_per_second" in s else []
        return ", ".join(parts)

    timed = {k: v for k, v in speed.items() if isinstance(v, dict) and figures(v)}
    stage = next((s for s in ("sft", "cpt", "base") if s in timed), None)
    if stage is None:
        return []
    device = timed[stage].get("device")
    line = (f"Generation speed ({stage} model, greedy, one prompt at a time"
            + (f", {device}" if device else "") + f"): {figures(timed[stage])}")
    if stage != "base" and "base" in timed:
        line += f"; the base model: {figures(timed['base'])}"
    return [line + ".", ""]


def tokenizer_facts(run_dir: str, model_dir: str, report: dict[str, Any]) -> dict[str, Any]:
    """What the card states about the pushed model's tokenizer: its size and, when the evaluate stage did not
    count it, its characters per token on the run's held-out Japanese text (``heldout/ja.jsonl``)."""
    from xlt.models import load_tokenizer

    if not any(os.path.isfile(os.path.join(model_dir, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
        return {}  # a model folder without its tokenizer: nothing to count with
    tokenizer = load_tokenizer(model_dir)
    facts: dict[str, Any] = {"vocab_size": len(tokenizer)}
    heldout = os.path.join(run_dir, "heldout", "ja.jsonl")
    detail = (report.get("eval") or {}).get("detail") or {}
    if not any(k.endswith("/ja") for k in detail) and os.path.isfile(heldout):
        from xlt.data.sources import read_documents

        docs = [d for d in read_documents(heldout) if d]
        if docs:
            facts["ja"] = {"chars": sum(map(len, docs)),
                           "tokens": sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs)}
    return facts


def model_card(repo: str, report: dict[str, Any], run: Optional[dict[str, Any]] = None,
               tokenizer_report: Optional[dict[str, Any]] = None, facts: Optional[dict[str, Any]] = None) -> str:
    """A model card from the run's figures: base model, tokenizer (its Japanese characters per token, and for an
    extended one the change), data sources and curriculum, tokens per language, hyper-parameters, evaluation
    results with the generation speed, data licences, intended use and limits, how to load. ``run`` is
    ``xlt_run.json`` (the recipe settings), ``tokenizer_report`` the tokenizer stage's ``tokenizer_report.json``,
    ``facts`` what :func:`tokenizer_facts` measured on the pushed model; all optional. A figure that was not
    measured and a setting that did not apply are left out, never printed as 'n/a'."""
    run = run or {}
    rc = run.get("cpt", {})
    base = report.get("cpt", {}).get("model") or rc.get("model") or "unknown"
    sources = rc.get("sources") or []
    lines = _front_matter(repo, base, sources, bool(report.get("sft")))
    lines += ["## Base model", "", f"`{base}`" + (f" (revision `{rc['model_revision']}`)"
                                                  if rc.get("model_revision") else ""), ""]
    lines += _tokenizer_lines(report, rc, tokenizer_report or {}, facts or {})
    lines += _data_lines(sources, rc, run.get("sft", {}))
    lines += _tokens_lines(report)
    lines += _hyper_parameter_lines(report, rc, run.get("sft", {}))
    lines += _evaluation_lines(report)
    lines += ["## Data licences", ""]
    lines += [f"- `{s.get('name')}`: {_licence(s)}" for s in sources] or ["- not recorded"]
    lines += ["- The base model's licence applies to the weights.", ""]
    lines += ["## Intended use and limits", "",
              "Research and experimentation with Japanese text generation. Trained only on the data listed above; "
              "outputs may be wrong, biased or unsafe, and the model has no safety tuning beyond its base model's. "
              "Not for decisions about people.", ""]
    lines += ["## How to load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
              f'model = AutoModelForCausalLM.from_pretrained("{repo}")', "```", ""]
    return "\n".join(lines)


def _front_matter(repo: str, base: str, sources: list[dict], with_sft: bool) -> list[str]:
    """The card's YAML header (base_model only for a hub id, datasets of hub sources) and its title."""
    datasets = sorted({s["dataset"] for s in sources if s.get("dataset")})
    front = ["---", "language: [ja, en]", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [xlt, continued-pretraining, japanese]"]
    if _REPO_ID.match(str(base)) and not os.path.exists(str(base)):
        front.append(f"base_model: {base}")
    if datasets:
        front.append("datasets: [" + ", ".join(datasets) + "]")
    return front + ["---", f"# {repo.split('/')[-1]}", "",
                    f"Japanese continued pretraining of `{base}` with xlt"
                    + (", then instruction SFT." if with_sft else "."), ""]


def _data_lines(sources: list[dict], rc: dict, rs: dict) -> list[str]:
    lines = ["## Data sources and curriculum", ""]
    lines += [_source_line(s) for s in sources] or ["- not recorded (no xlt_run.json)"]
    if rc:
        lines.append(f"- Japanese share: {rc.get('ja_schedule')} schedule from {rc.get('ja_ratio_start')} to "
                     f"{rc.get('ja_ratio_end')}; sequence length {rc.get('seq_len')} (warm-up from "
                     f"{rc.get('slw_min_len')} over the first {rc.get('slw_fraction')} of tokens)")
    if rs.get("sft_datasets"):
        lines.append("- SFT data: " + ", ".join(str(d.get("dataset") or d.get("embedded") or
                                                    os.path.basename(str(d.get("path", "?"))))
                                                for d in rs["sft_datasets"]))
    return lines + [""]


def _tokens_lines(report: dict) -> list[str]:
    trained = report.get("tokens_trained", {})
    if not trained:
        return ["## Tokens per language", "", "- not recorded (report.json has no tokens_trained)", ""]
    total = sum(trained.values()) or 1
    lines = ["## Tokens per language", "",
             f"- Tokens trained: {sum(trained.values()):,} ("
             + ", ".join(f"{k} {v:,} = {v / total:.1%}" for k, v in trained.items()) + ")"]
    by_src = report.get("cpt", {}).get("accounting", {}).get("tokens_by_source", {})
    if by_src:
        lines.append("- By source: " + ", ".join(f"{k} {v:,}" for k, v in by_src.items()))
    return lines + [""]


def _hyper_parameter_lines(report: dict, rc: dict, rs: dict) -> list[str]:
    sft = report.get("sft", {})
    lines = ["## Hyper-parameters", "", *_cpt_line(report.get("cpt", {}))]
    keys = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm",
            "per_device_train_batch_size", "gradient_accumulation_steps", "seq_len", "train_tokens", "torch_dtype")
    if rc:
        lines.append("- CPT settings: " + ", ".join(f"{k} {rc[k]}" for k in keys if k in rc))
    if sft:
        lines.append(f"- SFT: {sft.get('examples')} examples x {sft.get('epochs')} epochs, "
                     f"prompt format `{sft.get('prompt_format')}`, final loss {sft.get('train_loss')}")
    if rs:
        lines.append("- SFT settings: " + ", ".join(f"{k} {rs[k]}" for k in keys + ("num_train_epochs", "max_length")
                                                     if k in rs))
    return lines + [""]


def _evaluation_lines(report: dict) -> list[str]:
    lines = ["## Evaluation results", "", "Held-out text; bits per character are comparable across tokenizers.", "",
             "```", format_table(report), "```", ""]
    mc = {k: v for k, v in (report.get("mc") or {}).items() if isinstance(v, dict) and "accuracy" in v}
    if mc:
        lines += ["Multiple choice: " + ", ".join(f"{s} {v['accuracy']:.3f}" for s, v in mc.items()), ""]
    if isinstance(report.get("mt_bench"), dict) and "n" in report["mt_bench"]:
        lines += mt_bench_markdown(report["mt_bench"])
    lines += _speed_lines(report.get("speed") or {})
    gen = report.get("generation")
    if gen:
        lines += ["Sample:", "", f"> {gen['prompt']}", "", gen["output"], ""]
    return lines + ["Plots of the run: [REPORT.md](REPORT.md).", ""]


def _model_dir(run_dir: str) -> str:
    """The final model of a run: ``sft/`` if present, else ``cpt/``."""
    for stage in ("sft", "cpt"):
        d = os.path.join(run_dir, stage)
        if os.path.isfile(os.path.join(d, "config.json")):
            return d
    raise XltError(f"push: {run_dir} holds no sft/ or cpt/ model folder with config.json")


def _check_model_dir(model_dir: str, key: str) -> list[str]:
    """The files of ``model_dir`` to upload; refuses a folder without config.json or with pickle weights."""
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise XltError(f"{key}: {model_dir} holds no config.json")
    names = sorted(os.listdir(model_dir))
    if any(n.endswith(_PICKLES) for n in names):
        raise XltError(f"{key}: {model_dir} holds pickle weights; only safetensors are pushed")
    files = [n for n in names if os.path.isfile(os.path.join(model_dir, n))
             and any(fnmatch.fnmatch(n, p) for p in UPLOAD_PATTERNS)]
    if not any(n.endswith(".safetensors") for n in files):
        raise XltError(f"{key}: {model_dir} holds no .safetensors weights")
    return files


def check_hub_access(repo_id: str) -> Any:
    """An ``HfApi`` whose token may write to ``repo_id``'s namespace; raises a one-line ``XltError`` otherwise.

    Reads the token (HF_TOKEN or the login cache) and asks the Hub who it belongs to; accepts a classic token with
    the write role (and, for an organisation, a write-capable membership) or a fine-grained token with
    ``repo.write`` on that user or organisation. Uploads nothing. The token never enters a message."""
    if not _REPO_ID.match(repo_id or ""):
        raise XltError(f"--repo-id: {repo_id!r} is not ORG/NAME")
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise XltError("push: no Hugging Face token (set HF_TOKEN or run `hf auth login`); nothing uploaded")
    api = HfApi(token=token)
    try:
        info = api.whoami()
    except Exception as e:  # HTTP 401, offline mode, no network: the message may not echo the token
        raise XltError(f"push: the Hub did not accept the token or cannot be reached ({type(e).__name__}); "
                       "nothing uploaded") from None
    namespace = repo_id.split("/")[0]
    user = info.get("name")
    access = (info.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    if role == "fineGrained":
        fg = access.get("fineGrained") or {}
        ok = any((scope.get("entity") or {}).get("name") == namespace and "repo.write" in scope.get("permissions", [])
                 for scope in fg.get("scoped", []))
    else:
        ok = role in WRITE_ROLES
        if ok and namespace != user:
            orgs = {o.get("name"): o.get("roleInOrg") for o in info.get("orgs", [])}
            ok = orgs.get(namespace) in ORG_WRITE_ROLES
    if not ok:
        raise XltError(f"push: the token of {user!r} (role {role!r}) cannot write to {namespace!r}; "
                       "use a write token; nothing uploaded")
    return api


def _place(src: str, dst: str, copy: bool) -> None:
    """Put ``src`` at ``dst``: a copy for a folder the user keeps (dry run); otherwise a hard link, else a
    symbolic link, so a multi-gigabyte model is not copied just to be uploaded (upload_folder follows links)."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if copy:
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        os.symlink(os.path.abspath(src), dst)


def stage_upload(run_dir: str, model_dir: str, repo_id: str, dest: str, copy: bool = True) -> list[str]:
    """Write into ``dest`` exactly the folder that is uploaded: the model files, README.md (the card),
    REPORT.md with plots/ and report.json when the run has one. Reads ``run_dir``, writes only ``dest``.
    Returns the relative paths written, sorted."""
    files = _check_model_dir(model_dir, "--model")
    os.makedirs(dest, exist_ok=True)
    for name in files:
        _place(os.path.join(model_dir, name), os.path.join(dest, name), copy)
    report = _read_json(os.path.join(run_dir, "report.json"))
    if report:
        build_report(run_dir, dest=dest)
        _place(os.path.join(run_dir, "report.json"), os.path.join(dest, "report.json"), copy)
    card = model_card(repo_id, report, _read_json(os.path.join(run_dir, "xlt_run.json")),
                      _read_json(os.path.join(run_dir, "tokenizer", "tokenizer_report.json")),
                      tokenizer_facts(run_dir, model_dir, report))
    with open(os.path.join(dest, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
    return sorted(os.path.relpath(os.path.join(r, n), dest) for r, _, ns in os.walk(dest) for n in ns)


def push_run(run_dir: str, repo_id: str, private: bool = False, dry_run: bool = False,
             output: Optional[str] = None, model_dir: Optional[str] = None) -> str:
    """Push a run's final model with its card and report; returns the repo URL, or the staged folder (dry run).

    Order: inputs checked (model folder, repo id, empty ``output``), then the token and write access (not for a
    dry run), then the folder is staged outside ``run_dir``, then the repo is created and the folder uploaded."""
    if not os.path.isdir(run_dir):
        raise XltError(f"push: run directory {run_dir} not found")
    model_dir = model_dir or _model_dir(run_dir)
    _check_model_dir(model_dir, "--model")
    if not _REPO_ID.match(repo_id or ""):
        raise XltError(f"--repo-id: {repo_id!r} is not ORG/NAME")
    if output is not None:
        if not dry_run:
            raise XltError("--output: only with --dry-run (a real push stages in a temporary folder)")
        out = os.path.abspath(output)
        if out == os.path.abspath(run_dir) or out.startswith(os.path.abspath(run_dir) + os.sep):
            raise XltError(f"--output: {output} is inside the run directory; push never writes there")
        if os.path.exists(out) and os.listdir(out):
            raise XltError(f"--output: {output} exists and is not empty")
    if dry_run:
        dest = output or tempfile.mkdtemp(prefix="xlt-push-")
        stage_upload(run_dir, model_dir, repo_id, dest, copy=True)
        return dest
    api = check_hub_access(repo_id)
    with tempfile.TemporaryDirectory(prefix="xlt-push-") as tmp:
        stage_upload(run_dir, model_dir, repo_id, tmp, copy=False)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=tmp, repo_id=repo_id, repo_type="model", commit_message="Upload with xlt")
    return f"https://huggingface.co/{repo_id}"


def push(model_dir: str, repo: str, report_path: Optional[str] = None, private: bool = False,
         dry_run: bool = False, output: Optional[str] = None) -> str:
    """The older ``xlt push --model DIR --repo ORG/NAME`` form: the run directory is ``model_dir``'s parent (or
    that of ``report_path``). Returns the repo URL, or for a dry run the path of the staged README.md."""
    run_dir = os.path.dirname(os.path.abspath(report_path or model_dir))
    if report_path and not os.path.isfile(report_path):
        raise XltError(f"--report: {report_path} not found")
    result = push_run(run_dir, repo, private=private, dry_run=dry_run, output=output, model_dir=model_dir)
    return os.path.join(result, "README.md") if dry_run else result


__all__ = ["REPORT_MD", "check_hub_access", "model_card", "push", "push_run", "stage_upload"]
