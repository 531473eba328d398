"""Benchmark: training throughput (tokens/s) and model FLOPs utilisation (MFU) of a Llama config.

A random ``LlamaForCausalLM`` of the given shape on the device it finds (cuda if available, else
CPU), trained with a plain PyTorch loop, not the Trainer: forward + backward + gradient clipping
(max norm 1, the Trainer's default) + ``torch.optim.AdamW`` step + ``zero_grad``, on random token
batches prepared before the timing (data is not part of what is measured). ``--dtype bf16`` is
mixed precision as the Trainer's ``bf16=True``: float32 weights and optimizer, bf16 autocast.
The first ``--warmup`` steps are left out; the median step is reported.

MFU = model FLOPs per second / peak FLOPs per second. Peak: ``--peak-tflops``, else a table of
known GPUs (dense, no sparsity); on CPU, or an unknown GPU, ``--peak-tflops`` is required or
``mfu`` is null.

    python bench/mfu.py [--hidden 576 --layers 30 --heads 9 --kv-heads 3 --intermediate 1536
                         --vocab 49152 --seq-len 2048 --batch 8 --steps 20 --dtype bf16 --attn sdpa]
                        [--peak-tflops 989] [--json]

Defaults: on cuda the SmolLM2-135M shape (xlt's default model) at 2048 tokens in bf16; on CPU a
tiny model in float32, so the script stays quick and tested.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Dense peak TFLOP/s by GPU name (a substring of torch.cuda.get_device_name), from the vendors' data
# sheets. bf16: tensor cores; fp32: plain float32 (torch's default keeps TF32 off for matmuls).
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},  # SXM
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
}

DEFAULTS = {  # shape, length and precision per device type
    "cuda": {"hidden": 576, "layers": 30, "heads": 9, "kv_heads": 3, "intermediate": 1536, "vocab": 49152,
             "seq_len": 2048, "batch": 8, "steps": 20, "warmup": 3, "dtype": "bf16"},
    "cpu": {"hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 512, "vocab": 8192,
            "seq_len": 256, "batch": 2, "steps": 5, "warmup": 2, "dtype": "fp32"},
}


def flops_per_token(model, layers: int, hidden: int, seq_len: int) -> tuple[float, int]:
    """Training FLOPs per token, PaLM (Chowdhery et al. 2022) appendix B: 6 N + 12 L H Q T.

    N: the non-embedding parameters, i.e. every weight that takes part in a matrix product; the
    input embedding is a lookup and is left out, the output projection (LM head, a vocab x hidden
    matmul) is counted once whether or not it is tied to the embedding. 6 = 2 (multiply-add)
    x 3 (forward, backward for activations, backward for weights).
    12 L H Q T = 12 x layers x hidden (heads x head dim) x sequence length: the attention score and
    value products (QK^T and AV), forward and backward, counted over the full T x T matrix as in
    PaLM (no discount for the causal mask).
    Returns (FLOPs per token, N).
    """
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    n = sum(p.numel() for p in model.parameters()) - emb.numel()
    if head is emb:  # tied: the head's matmul still costs vocab x hidden per token
        n += head.numel()
    return 6.0 * n + 12.0 * layers * hidden * seq_len, n


def peak_tflops(device_name: str, dtype: str) -> float | None:
    for key, peaks in PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
        if key.lower() in device_name.lower():
            return peaks[dtype]
    return None


def build(ns, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=ns.vocab, hidden_size=ns.hidden, intermediate_size=ns.intermediate,
                      num_hidden_layers=ns.layers, num_attention_heads=ns.heads, num_key_value_heads=ns.kv_heads,
                      max_position_embeddings=max(2048, ns.seq_len), tie_word_embeddings=True, use_cache=False,
                      attn_implementation=ns.attn)
    return LlamaForCausalLM(cfg).to(device)


def measure(ns, device: str, device_name: str) -> dict:
    import torch

    model = build(ns, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, ns.vocab, (ns.batch, ns.seq_len), generator=gen).to(device)
               for _ in range(min(ns.warmup + ns.steps, 4))]
    bf16 = ns.dtype == "bf16"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(ns.warmup + ns.steps):
        x = batches[i % len(batches)]
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    step = statistics.median(times[ns.warmup:])
    fpt, n_matmul = flops_per_token(model, ns.layers, ns.hidden, ns.seq_len)
    tokens = ns.batch * ns.seq_len
    tps = tokens / step
    peak = ns.peak_tflops if ns.peak_tflops else (peak_tflops(device_name, ns.dtype) if device == "cuda" else None)
    return {
        "device": device_name, "device_type": device, "params": sum(p.numel() for p in model.parameters()),
        "params_in_matmuls": n_matmul, "tokens_per_second": round(tps, 2),
        "mfu": tps * fpt / (peak * 1e12) if peak else None, "peak_tflops": peak,
        "achieved_tflops": round(tps * fpt / 1e12, 4), "flops_per_token": fpt,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda" else None,
        "step_seconds": round(step, 5), "step_seconds_min": round(min(times[ns.warmup:]), 5),
        "steps_timed": ns.steps, "warmup_steps": ns.warmup, "tokens_per_step": tokens,
        "config": {"hidden": ns.hidden, "layers": ns.layers, "heads": ns.heads, "kv_heads": ns.kv_heads,
                   "intermediate": ns.intermediate, "vocab": ns.vocab, "seq_len": ns.seq_len, "batch": ns.batch,
                   "dtype": ns.dtype, "attn": ns.attn},
        "loop": "plain PyTorch: forward + backward + clip_grad_norm_ + AdamW, no Trainer",
        "loss_finite": all(v == v and abs(v) != float("inf") for v in losses),
        "threads": torch.get_num_threads() if device == "cpu" else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab", "seq-len", "batch", "steps", "warmup"):
        ap.add_argument(f"--{name}", type=int, default=None, help="default: per device (see the module docstring)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="bf16: autocast over float32 weights")
    ap.add_argument("--attn", choices=("sdpa", "eager", "flex_attention", "flash_attention_2"), default="sdpa")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for the dtype (default: GPU table)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ns = ap.parse_args(argv)

    import torch

    device = ns.device if ns.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    for key, value in DEFAULTS[device].items():
        if getattr(ns, key) is None:
            setattr(ns, key, value)
    if ns.hidden % ns.heads or ns.heads % ns.kv_heads:
        ap.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    if ns.steps < 1:
        ap.error("--steps must be at least 1")
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    try:
        r = measure(ns, device, device_name)
    except (ImportError, ValueError) as e:  # e.g. flash_attention_2 without the flash_attn package
        print(f"mfu: {type(e).__name__}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if ns.json:
        print(json.dumps(r))
        return 0
    c = r["config"]
    print(f"{r['device']}: Llama {r['params']:,} params ({r['params_in_matmuls']:,} in matmuls); hidden "
          f"{c['hidden']}, {c['layers']} layers, {c['heads']}/{c['kv_heads']} heads, vocab {c['vocab']:,}; "
          f"{c['dtype']}, attn {c['attn']}")
    print(f"batch {c['batch']} x seq_len {c['seq_len']} = {r['tokens_per_step']:,} tokens/step; "
          f"median of {r['steps_timed']} steps after {r['warmup_steps']} warm-up")
    mfu = f"{r['mfu']:.1%} of {r['peak_tflops']:g} TFLOP/s" if r["mfu"] is not None else "n/a (give --peak-tflops)"
    mem = f"{r['peak_memory_gb']:.2f} GB" if r["peak_memory_gb"] is not None else "n/a"
    print(f"{'step s':>9} {'tokens/s':>11} {'GFLOP/token':>12} {'TFLOP/s':>9} {'peak mem':>9}  MFU")
    print(f"{r['step_seconds']:>9.4f} {r['tokens_per_second']:>11,.0f} {r['flops_per_token'] / 1e9:>12.4f} "
          f"{r['achieved_tflops']:>9.3f} {mem:>9}  {mfu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
