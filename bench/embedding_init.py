"""Benchmark: which initialisation of the new embedding rows starts the extended model best?

Extends SmolLM2 (the embedded model) once by ``--new-tokens`` merges learned on the shared Japanese
text (every 10th paragraph held out, as bench/extension_breakeven.py), then for each method resizes a
fresh copy, initialises the new rows and reports held-out bits per character (xlt.eval.bpc: per
character, so token counts cannot flatter a method) right after extension (step 0), and optionally after
``--probe-steps`` training steps at fixed small settings (the issue: ~50 steps ranks methods better than
step 0). ``base`` is the unextended model. ``init_flops`` is what the method itself spent (distill).

Usage: python bench/embedding_init.py [--new-tokens 1024] [--probe-steps 0] [--methods ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from extension_breakeven import load_data, pack  # noqa: E402 - same data split and packing as that bench

# name -> (embedding_init, output_embedding_init, untie_embeddings)
ARMS = {
    "subword_mean": ("subword_mean", "same", False),
    "merge_tree": ("merge_tree", "same", False),
    "mean": ("mean", "same", False),
    "distill": ("distill", "same", False),
    "untied_distill": ("distill", "same", True),  # distilled input rows, subword-mean output rows
    "untied_first_subtoken": ("subword_mean", "first_subtoken", True),
    "untied_char_weighted_mean": ("subword_mean", "char_weighted_mean", True),
    "untied_calibrated": ("subword_mean", "calibrated_first_subtoken", True),
    "untied_distill_calibrated": ("distill", "calibrated_first_subtoken", True),
}


def probe(model, rows: list[list[int]], steps: int, lr: float = 1e-4, batch: int = 4) -> dict:
    """``steps`` AdamW steps (LR ``lr``, 5-step warm-up, no decay, clip 1.0) on packed rows, every weight."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    model.train()
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 5)
        x = torch.tensor([rows[(step * batch + k) % len(rows)] for k in range(batch)])
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return {"probe_steps": steps, "probe_tokens": steps * batch * len(rows[0]), "probe_seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--methods", nargs="+", default=["base", *ARMS], choices=["base", *ARMS])
    ap.add_argument("--probe-steps", type=int, default=0, help="Training steps after extension (0: step 0 only).")
    ap.add_argument("--probe-methods", nargs="+", default=None, help="Arms that get the probe (default: all).")
    ap.add_argument("--probe-seq-len", type=int, default=128)
    ap.add_argument("--distill-steps", type=int, default=None, help="Default: TokenizerArguments' distill_steps.")
    ap.add_argument("--eval-docs", type=int, default=30, help="Held-out Japanese paragraphs scored.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from xlt.config import TokenizerArguments
    from xlt.eval.bpc import bits_per_char
    from xlt.models import load_model, load_tokenizer
    from xlt.tokenizer.embeddings import padded_size
    from xlt.tokenizer.extend import extend_tokenizer_json, init_new_rows
    from xlt.tokenizer.merges import detect_family, japanese_share, read_tokenizer_json

    torch.manual_seed(0)
    stream, held = load_data()
    held = {"ja": held["ja"][: args.eval_docs], "en": [held["en"][0][:4000]]}
    ja_train = [d for d in stream if japanese_share([d]) > 0.2]
    base_tok = load_tokenizer(args.model)
    base_tj = read_tokenizer_json(args.model)
    t0 = time.time()
    ext = extend_tokenizer_json(base_tj, ja_train, args.new_tokens)
    t_ext = time.time() - t0
    new = ext.tokenizer()
    ext_tok = PreTrainedTokenizerFast(tokenizer_object=new, bos_token=base_tok.bos_token, eos_token=base_tok.eos_token,
                                      pad_token=base_tok.pad_token)
    old = Tokenizer.from_str(json.dumps(base_tj))
    pieces = {i: [t.id for t in old.model.tokenize(new.id_to_token(i))] for i in ext.new_ids}
    family = detect_family(ext.tokenizer_json)

    results = []
    for name in args.methods:
        t0 = time.time()
        model = load_model(args.model, torch_dtype="float32")
        model.eval()
        tok, summary = base_tok, {"init_flops": 0}
        if name != "base":
            init, out_init, untie = ARMS[name]
            kw = {} if args.distill_steps is None else {"distill_steps": args.distill_steps}
            targs = TokenizerArguments(tokenizer_mode="extend", new_tokens=args.new_tokens, embedding_init=init,
                                       output_embedding_init=out_init, untie_embeddings=untie, **kw)
            rows = model.get_input_embeddings().weight.shape[0]
            summary = init_new_rows(model, targs, padded_size(max(ext.new_ids) + 1, 64), {i: i for i in range(rows)},
                                    pieces, old, new, ext.tokenizer_json, family, ja_train,
                                    skip_merges=len(base_tj["model"]["merges"]))
            tok = ext_tok
        t_init = time.time() - t0
        row = {"name": name, "init_flops": summary.get("init_flops", 0), "init_seconds": round(t_init, 1)}
        with torch.no_grad():
            for lang, texts in held.items():
                row[f"{lang}_bpc_step0"] = round(bits_per_char(model, tok, texts, max_length=512)["bits_per_char"], 4)
        if args.probe_steps > 0 and (args.probe_methods is None or name in args.probe_methods):
            row.update(probe(model, pack(tok, stream, args.probe_seq_len), args.probe_steps))
            with torch.no_grad():
                for lang, texts in held.items():
                    row[f"{lang}_bpc_probe"] = round(bits_per_char(model, tok, texts, max_length=512)["bits_per_char"], 4)
        if "distill_loss_first" in summary:
            row.update({k: summary[k] for k in ("distill_steps", "distill_loss_first", "distill_loss_last",
                                                 "distill_seconds")})
        if "calibration_tokens" in summary:
            row.update({k: summary[k] for k in ("calibration_tokens", "calibration_rows_seen",
                                                 "calibration_direction_fit", "calibration_seconds")})
        row["seconds"] = round(time.time() - t0, 1)
        results.append(row)
        if not args.json:
            print(json.dumps(row), flush=True)
    out = {"model": args.model, "new_tokens": len(ext.new_ids), "extension_seconds": round(t_ext, 1),
           "ja_eval_docs": len(held["ja"]), "probe_steps": args.probe_steps, "results": results}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        cols = ["ja_bpc_step0", "en_bpc_step0"] + (["ja_bpc_probe", "en_bpc_probe"] if args.probe_steps else [])
        print(f"{'method':28s} " + " ".join(f"{c:>13s}" for c in cols) + f" {'init_flops':>11s}")
        for r in results:
            print(f"{r['name']:28s} " + " ".join(f"{r.get(c, float('nan')):13.4f}" for c in cols)
                  + f" {r['init_flops']:11.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
