"""Benchmark: does extending the tokenizer pay off at equal compute?

Starting from SmolLM2, continue pretraining on the same Japanese/English text stream for the same
wall time, once with the base tokenizer and once extended (``--new-tokens`` merges, ``--init``),
then report held-out Japanese and English bits per character (tokenizer-independent).

Plain PyTorch loop (AdamW, constant LR after a short warm-up) over packed rows, CPU float32.
Usage: python bench/extension_breakeven.py [--minutes 7] [--new-tokens 4000] [--init subword_mean] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DATA = os.environ.get("XLT_SHARED_DATA", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))


def load_data(en_chunk: int = 1000) -> tuple[list[str], dict[str, list[str]]]:
    """(mixed training documents, held-out {'ja','en'}); JA = every 10th paragraph held out."""
    with open(os.path.join(DATA, "ja_wiki_paragraphs.jsonl"), encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f if line.strip()]
    ja_train = [d for i, d in enumerate(docs) if i % 10 != 9]
    ja_held = [d for i, d in enumerate(docs) if i % 10 == 9][:30]
    with open(os.path.join(DATA, "en_tinyshakespeare.txt"), encoding="utf-8") as f:
        en = f.read()
    en_train_text, en_held = en[:-8000], [en[-8000:]]
    en_train = [en_train_text[i : i + en_chunk] for i in range(0, len(en_train_text), en_chunk)]
    # Same number of characters of each language in the stream (English is much larger).
    ja_chars = sum(map(len, ja_train))
    en_train = en_train[: max(1, ja_chars // en_chunk)]
    stream = ja_train + en_train
    random.Random(0).shuffle(stream)
    return stream, {"ja": ja_held, "en": en_held}


def pack(tokenizer, docs: list[str], seq_len: int) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer(d, add_special_tokens=False)["input_ids"] + [eos])
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


def warm_new_rows(model, rows: list[list[int]], seconds: float, lr: float, batch: int, first_new: int) -> dict:
    """Stage 1 of the two-stage recipe: train only the new embedding rows (the body frozen).

    Freezing the body skips its weight gradients, so a step costs about 2 instead of 3 forward passes;
    old rows get a zero gradient, so every original token keeps its embedding exactly.
    """
    import torch

    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    params = [emb] if head is emb else [emb, head]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    mask = torch.zeros(emb.shape[0], 1)
    mask[first_new:] = 1.0
    hooks = [p.register_hook(lambda g: g * mask) for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    model.train()
    t0, step = time.time(), 0
    while time.time() - t0 < seconds:
        x = torch.tensor([rows[(step * batch + k) % len(rows)] for k in range(batch)])
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
    for h in hooks:
        h.remove()
    for p in model.parameters():
        p.requires_grad_(True)
    return {"warmup_steps": step, "warmup_tokens": step * batch * len(rows[0]), "warmup_seconds": round(time.time() - t0, 1)}


def train(model, rows: list[list[int]], minutes: float, lr: float, batch: int, warmup: int = 5,
          first_new: int | None = None, new_rows_lr_mult: float = 1.0) -> dict:
    """Full training for ``minutes``; with ``new_rows_lr_mult`` > 1 the new embedding rows take bigger steps.

    The rows share one tensor with the old ones, so no optimizer param group can give them their own
    learning rate: the update of the new rows is scaled after each step instead (Adam's step size does not
    change with the gradient's scale, so scaling gradients would not do it).
    """
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    scaled = []
    if first_new is not None and new_rows_lr_mult != 1.0:
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        scaled = [emb] if head is emb else [emb, head]
    model.train()
    t0, step, tokens, losses = time.time(), 0, 0, []
    while time.time() - t0 < minutes * 60:
        b = [rows[(step * batch + k) % len(rows)] for k in range(batch)]
        x = torch.tensor(b)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before = [p.data[first_new:].clone() for p in scaled]
        opt.step()
        for p, b in zip(scaled, before):
            p.data[first_new:] = b + new_rows_lr_mult * (p.data[first_new:] - b)
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        step += 1
        tokens += x.numel()
    model.eval()
    return {"steps": step, "tokens": tokens, "seconds": round(time.time() - t0, 1),
            "epochs_of_stream": round(step * batch / max(1, len(rows)), 3),
            "final_loss": round(sum(losses[-5:]) / max(1, len(losses[-5:])), 4) if losses else None}


def extended_model(args, stream: list[str]):
    """SmolLM2 with ``args.new_tokens`` Japanese merges learned on the stream's Japanese documents, its new rows
    initialised exactly as the tokenizer stage does (``init_new_rows``: ``--init``, ``--output-init``,
    ``--untie``, ``--distill-steps``). Returns (model, tokenizer, new tokens, init summary)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from xlt.config import TokenizerArguments
    from xlt.models import load_model, load_tokenizer
    from xlt.tokenizer.embeddings import padded_size
    from xlt.tokenizer.extend import extend_tokenizer_json, init_new_rows
    from xlt.tokenizer.merges import japanese_share, read_tokenizer_json

    base_tok = load_tokenizer(args.model)
    base_tj = read_tokenizer_json(args.model)
    ja_docs = [d for d in stream if japanese_share([d]) > 0.2]
    ext = extend_tokenizer_json(base_tj, ja_docs, args.new_tokens)
    tok = PreTrainedTokenizerFast(tokenizer_object=ext.tokenizer(), bos_token=base_tok.bos_token,
                                  eos_token=base_tok.eos_token, pad_token=base_tok.pad_token)
    model = load_model(args.model, torch_dtype="float32")
    rows = model.get_input_embeddings().weight.shape[0]
    old = Tokenizer.from_str(json.dumps(base_tj))
    new = ext.tokenizer()
    pieces = {i: [t.id for t in old.model.tokenize(new.id_to_token(i))] for i in ext.new_ids}
    tok_args = TokenizerArguments(tokenizer_mode="extend", embedding_init=args.init, output_embedding_init=args.output_init,
                                  untie_embeddings=args.untie,
                                  **({"distill_steps": args.distill_steps} if args.distill_steps is not None else {}))
    summary = init_new_rows(model, tok_args, padded_size(max(ext.new_ids) + 1, 64), {i: i for i in range(rows)},
                            pieces, old, new, ext.tokenizer_json, ext.family, ja_docs,
                            skip_merges=len(base_tj["model"]["merges"]))
    return model, tok, len(ext.new_ids), summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--minutes", type=float, default=7.0, help="Training wall time of each run.")
    ap.add_argument("--new-tokens", type=int, default=4000)
    ap.add_argument("--init", default="subword_mean", help="embedding_init of the new rows (as the tokenizer stage).")
    ap.add_argument("--output-init", default="same", help="output_embedding_init (untied head; see --untie).")
    ap.add_argument("--untie", action="store_true", help="untie_embeddings: untie SmolLM2's head first.")
    ap.add_argument("--distill-steps", type=int, default=None, help="--init distill: steps (default: the recipe key's).")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--warmup-fraction", type=float, default=0.2,
                    help="Also run 'extended+warmup': this share of the same wall time trains only the new rows.")
    ap.add_argument("--warmup-lr", type=float, default=1e-3)
    ap.add_argument("--new-rows-lr-mult", type=float, default=1.0,
                    help="Extended runs: scale the new rows' updates by this factor (their own, higher LR).")
    ap.add_argument("--runs", default="base,extended,extended+warmup", help="Which runs, comma-separated.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from xlt.eval.bpc import bits_per_char
    from xlt.models import load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    stream, held = load_data()

    def bpc(model, tok) -> dict:
        return {lang: round(bits_per_char(model, tok, texts)["bits_per_char"], 4) for lang, texts in held.items()}

    runs = {}
    names = [n for n in args.runs.split(",") if n != "extended+warmup" or args.warmup_fraction > 0]
    for name in names:
        t0 = time.time()
        if name == "base":
            model, tok, n_new = load_model(args.model, torch_dtype="float32"), load_tokenizer(args.model), 0
            init = {}
        else:
            model, tok, n_new, init = extended_model(args, stream)
        setup = time.time() - t0
        before = bpc(model, tok)
        rows = pack(tok, stream, args.seq_len)
        # Equal wall time: what the initialisation spent running the model (distill) comes out of the training time.
        minutes, warm = args.minutes - init.get("distill_seconds", 0.0) / 60, {}
        first_new = len(load_tokenizer(args.model)) if name != "base" else None
        if name == "extended+warmup":  # the same total wall time, split between the two stages
            warm = warm_new_rows(model, rows, args.warmup_fraction * args.minutes * 60, args.warmup_lr, args.batch,
                                 first_new)
            minutes -= args.warmup_fraction * args.minutes
        if warm:  # stage 2 continues the stream where stage 1 stopped
            k = warm["warmup_steps"] * args.batch % len(rows)
            rows = rows[k:] + rows[:k]
        info = train(model, rows, minutes, args.lr, args.batch, first_new=first_new,
                     new_rows_lr_mult=args.new_rows_lr_mult)
        info.update(warm)
        after = bpc(model, tok)
        runs[name] = {"new_tokens": n_new, "init": {k: v for k, v in init.items() if not isinstance(v, dict)},
                      "bpc_before": before, "bpc_after": after, "stream_rows": len(rows),
                      "stream_tokens": len(rows) * args.seq_len, "setup_seconds": round(setup, 1), **info}
        del model
    result = {"model": args.model, "minutes": args.minutes, "init": args.init, "output_init": args.output_init,
              "untie": args.untie, "lr": args.lr,
              "new_rows_lr_mult": args.new_rows_lr_mult,
              "seq_len": args.seq_len, "batch": args.batch, "runs": runs}
    if args.json:
        print(json.dumps(result))
        return 0
    b = runs.get("base")
    print(f"{args.minutes} min of CPT each, lr {args.lr}, batch {args.batch}x{args.seq_len}, init {args.init}")
    print(f"{'run':<10} {'new tok':>7} {'JA bpc 0':>8} {'EN bpc 0':>8} {'steps':>6} {'tokens':>7} {'epochs':>6} "
          f"{'JA bpc':>7} {'EN bpc':>7}")
    for name, r in runs.items():
        print(f"{name:<10} {r['new_tokens']:>7} {r['bpc_before']['ja']:>8.3f} {r['bpc_before']['en']:>8.3f} {r['steps']:>6} "
              f"{r['tokens']:>7} {r['epochs_of_stream']:>6.2f} {r['bpc_after']['ja']:>7.3f} {r['bpc_after']['en']:>7.3f}")
    for name in [n for n in names if n != "base" and b]:
        e = runs[name]
        print(f"{name} / base after CPT: JA {e['bpc_after']['ja'] / b['bpc_after']['ja']:.3f}, "
              f"EN {e['bpc_after']['en'] / b['bpc_after']['en']:.3f}; the stream is "
              f"{b['stream_tokens'] / max(1, e['stream_tokens']):.2f}x more tokens with the base tokenizer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
