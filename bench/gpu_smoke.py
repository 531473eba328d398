"""The GPU path in one call: per-document flash attention on packed rows, then a short FSDP2 CPT run of a
1B-shape Llama through xlt's own launch path (``accelerate launch recipes/cpt.py``), with bf16, compiled blocks
and the fused cross-entropy, next to ``xlt check``'s memory estimate for the same settings.

    bash bench/gpu_smoke.sh [--wheels DIR] [--steps 30]      # one GPU, <= 8 minutes, prints one JSON line
    python bench/gpu_smoke.py --cpu [--json]                  # the same code path on CPU, tiny shapes (tests)

Nothing is fetched: the model is a random 1B-shape Llama (Llama-3.2-1B's layer shape with a 32K vocabulary),
the tokenizer a byte-level BPE trained here on the generated text, the data two generated jsonl files (Japanese
and English). Printed keys: ``device``, ``attention`` (kernel, ``max_abs_diff`` between the loss of packed rows
at batch 2 and the loss of each document alone), ``cpt`` (``tokens_per_second`` median of the logged windows
after the first, ``mfu`` with bench/mfu.py's FLOPs per token and peak table, ``peak_memory_gb`` measured,
``estimated_memory_gb`` and its breakdown from ``xlt check``, the report's launcher / attention / loss), and
``seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SHAPES = {  # (hidden, layers, heads, kv_heads, intermediate, vocab, seq_len, batch)
    "gpu": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=32000, seq_len=2048, batch=4),
    "cpu": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, seq_len=128, batch=2),
}
_KANA = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん"
_KANJI = "日本東京大学研究言語学習時間社会経済文化歴史自然科学技術情報世界国家政治"
_EN = ("the model reads text from many sources and learns to predict the next token in every document while "
       "attention stays inside each document of a packed row").split()


def _doc(rng: random.Random, lang: str) -> str:
    if lang == "ja":
        n = rng.randint(40, 400)
        return "".join(rng.choice(_KANJI) if rng.random() < 0.3 else rng.choice(_KANA) for _ in range(n)) + "。"
    return " ".join(rng.choice(_EN) for _ in range(rng.randint(20, 200))) + "."


def write_data(out: Path, docs: int) -> dict[str, Path]:
    rng = random.Random(0)
    paths = {}
    for lang in ("ja", "en"):
        paths[lang] = out / f"{lang}.jsonl"
        with open(paths[lang], "w", encoding="utf-8") as f:
            for _ in range(docs):
                f.write(json.dumps({"text": _doc(rng, lang)}, ensure_ascii=False) + "\n")
    return paths


def write_model(out: Path, shape: dict, data: dict[str, Path]) -> Path:
    """A random Llama of ``shape`` (saved in bf16, as hub models are) with a byte-level BPE trained on ``data``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for p in data.values() for line in p.read_text(encoding="utf-8").splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(shape["vocab"], 4096), special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], max_position_embeddings=max(2048, shape["seq_len"]),
                      tie_word_embeddings=False, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def attention_check(device: str, attn: str, seq: int = 512) -> dict:
    """Loss of packed rows at batch 2 in the layout xlt gives ``attn`` vs each document alone (same kernel).

    On the flash path the rows are flattened to one varlen row (xlt/data/collate.py); the control is the same
    kernel on the (B, S) rows as they are, which lets documents attend to each other.
    """
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from xlt.data.collate import PackedRowsCollator
    from xlt.data.packing import RowBuilder

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq, use_cache=False)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    model.config._attn_implementation = attn
    rng = np.random.default_rng(0)
    rows, docs = [], []
    for _ in range(2):
        rb, left = RowBuilder(seq, seq), seq
        while left > 0:
            n = int(min(left, rng.integers(16, seq // 3)))
            tokens = rng.integers(0, cfg.vocab_size, n)
            rb.add(tokens)
            docs.append(torch.from_numpy(tokens).long())
            left -= n
        ids, pos, labels = rb.finish()
        rows.append({"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(pos),
                     "labels": torch.from_numpy(labels)})
    collator = PackedRowsCollator(attn)
    batch = {k: v.to(device) for k, v in collator(rows).items()}
    with torch.no_grad():
        packed = model(**collator.for_model(dict(batch))).loss.float()
        control = model(**batch).loss.float()
        total, count = torch.zeros((), dtype=torch.float64), 0
        for d in docs:
            if len(d) < 2:
                continue
            x = d[None].to(device)
            logits = model(input_ids=x).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").double().cpu()
            count += len(d) - 1
    reference = float(total / count)
    return {"kernel": attn, "layout": collator.layout, "dtype": str(dtype).replace("torch.", ""),
            "documents": len(docs), "packed_loss": round(float(packed), 6), "per_document_loss": round(reference, 6),
            "max_abs_diff": abs(float(packed) - reference),
            "rows_as_is_abs_diff": abs(float(control) - reference)}


def write_recipe(out: Path, model_dir: Path, data: dict[str, Path], shape: dict, steps: int, cpu: bool,
                 processes: int) -> Path:
    """The CPT recipe of the run: the shipped GPU recipes' settings (bf16, auto attention, fused loss, compiled
    blocks, spike guard, fp32 master weights) at the smoke's shape and length."""
    import yaml

    tokens_per_step = shape["seq_len"] * shape["batch"] * processes
    recipe = {
        "model": str(model_dir), "tokenizer_mode": "none", "attn_implementation": "auto",
        "master_weights_dtype": "float32", "compile_blocks": not cpu, "loss_implementation": "auto",
        "sources": [{"name": f"smoke-{lang}", "lang": lang, "path": str(p), "holdout": 0.05} for lang, p in data.items()],
        "ja_schedule": "linear", "ja_ratio_start": 0.5, "ja_ratio_end": 0.8, "seq_len": shape["seq_len"],
        "train_tokens": tokens_per_step * steps, "eval_max_docs": 4,
        "output_dir": str(out / "run"), "per_device_train_batch_size": shape["batch"],
        "gradient_accumulation_steps": 1, "learning_rate": 1e-4, "lr_scheduler_type": "cosine", "warmup_steps": 2,
        "weight_decay": 0.1, "max_grad_norm": 1.0, "spike_factor": 2.0, "bf16": not cpu, "use_cpu": cpu,
        "logging_steps": 5 if not cpu else 1, "save_steps": 10 * steps, "report_to": "none", "seed": 0,
        "dataloader_num_workers": 0, "disable_tqdm": True,
    }
    path = out / "cpt.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def write_accelerate_config(out: Path, cpu: bool, processes: int) -> Path:
    """FSDP2 on the one GPU, or on 2 gloo CPU processes (xlt sets FSDP up there, as cpu_fsdp2.yaml)."""
    import yaml

    cfg = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "mixed_precision": "no" if cpu else "bf16",
           "num_machines": 1, "num_processes": processes, "machine_rank": 0, "use_cpu": cpu,
           "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                           "fsdp_reshard_after_forward": True, "fsdp_state_dict_type": "SHARDED_STATE_DICT",
                           "fsdp_cpu_ram_efficient_loading": False}}
    path = out / "fsdp2.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def _run(cmd: list[str], env: dict, timeout: float, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if proc.returncode not in ok:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{tail}")
    return proc


def cpt_run(out: Path, shape: dict, steps: int, cpu: bool, timeout: float) -> dict:
    """The CPT stage under ``accelerate launch`` (FSDP2), then ``xlt check``'s estimate for the same settings."""
    import torch
    from mfu import flops_per_token, peak_tflops
    from transformers import LlamaConfig, LlamaForCausalLM

    data = write_data(out, docs=64 if cpu else 4000)
    model_dir = write_model(out / "model", shape, data)
    processes = 2 if cpu else 1  # FSDP on the CPU needs 2 gloo processes
    recipe = write_recipe(out, model_dir, data, shape, steps, cpu, processes)
    acc = write_accelerate_config(out, cpu, processes)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    bindir = Path(sys.executable).parent
    accelerate = [str(bindir / "accelerate")] if (bindir / "accelerate").is_file() else \
        [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
    t0 = time.time()
    proc = _run([*accelerate, "launch", "--config_file", str(acc), "recipes/cpt.py", "--config", str(recipe)],
                env, timeout)
    seconds = time.time() - t0
    report = json.loads((out / "run" / "report.json").read_text(encoding="utf-8"))["cpt"]
    windows = [float(v) for v in re.findall(r"'tokens_per_second': '?([0-9.e+]+)", proc.stdout)]
    tps = statistics.median(windows[1:]) if len(windows) > 1 else (windows[0] if windows else None)
    check = _run([sys.executable, "-m", "xlt.cli", "check", "--config", str(recipe), "--accelerate_config", str(acc),
                  "--offline", "--gpus", "0" if cpu else "1", "--gpu-memory-gb", "80", "--json"], env, 300,
                 ok=(0, 1))  # exit 1: problems, still an estimate
    estimate = json.loads(check.stdout.strip().splitlines()[-1])
    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], tie_word_embeddings=False)
    with torch.device("meta"):
        fpt, n = flops_per_token(LlamaForCausalLM(cfg), shape["layers"], shape["hidden"], shape["seq_len"])
    peak = None if cpu else peak_tflops(torch.cuda.get_device_name(), "bf16")
    return {"shape": shape, "steps": report["steps"], "params_in_matmuls": n,
            "tokens_per_second": tps, "logged_windows": len(windows),
            "mfu": (tps * fpt / (peak * 1e12)) if (tps and peak) else None, "peak_tflops": peak,
            "peak_memory_gb": report.get("peak_memory_gb"),
            "estimated_memory_gb": estimate.get("memory_per_gpu_gb"),
            "estimated_breakdown_gb": estimate.get("memory_breakdown_gb"), "check_ok": estimate.get("ok"),
            "check_problems": estimate.get("problems"),
            "launcher": report.get("launcher"), "attn_implementation": report.get("attn_implementation"),
            "packed_layout": report.get("packed_layout"), "loss_implementation": report.get("loss_implementation"),
            "throughput_keys": report.get("throughput"), "precision": report.get("precision"),
            "train_loss": report.get("train_loss"), "skipped_steps": report.get("skipped_steps"),
            "launch_seconds": round(seconds, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="dry mode: the same path on CPU, tiny shapes (tests)")
    ap.add_argument("--steps", type=int, default=30, help="CPT optimizer steps (default 30)")
    ap.add_argument("--timeout", type=float, default=420.0, help="seconds for the CPT launch (default 420)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (the default output anyway)")
    ns = ap.parse_args(argv)
    if ns.steps < 1:
        ap.error("--steps must be at least 1")
    import torch

    if not ns.cpu and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device (use --cpu for the dry mode)", file=sys.stderr)
        return 2
    from xlt.train.runtime import resolve_attn_implementation

    t0 = time.time()
    device = "cpu" if ns.cpu else "cuda"
    attn = resolve_attn_implementation("auto", cuda=not ns.cpu)
    shape = SHAPES["cpu" if ns.cpu else "gpu"]
    result: dict = {"device": f"cpu ({os.cpu_count()} cores)" if ns.cpu else torch.cuda.get_device_name(),
                    "torch": torch.__version__, "mode": "cpu-dry" if ns.cpu else "gpu"}
    try:
        result["attention"] = attention_check(device, attn, seq=256 if ns.cpu else 2048)
        with tempfile.TemporaryDirectory(prefix="xlt-gpu-smoke-") as tmp:
            result["cpt"] = cpt_run(Path(tmp), shape, ns.steps, ns.cpu, ns.timeout)
    except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as e:
        result["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(result))
        return 1
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
