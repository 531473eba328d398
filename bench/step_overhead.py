"""Benchmark: the cost of xlt's continued-pretraining step over a plain transformers Trainer step.

Same random Llama (initial weights identical), same packed rows in the same order, same batch size,
same ``position_ids`` (packed, per-document attention), same optimiser and schedule, in ONE process:

* xlt: ``xlt.train.trainer.CptTrainer`` with the spike guard enabled,
  ``XltStateCallback`` and token accounting in every log, set up as ``run_cpt`` does
  (:func:`make_xlt_trainer`), fed by ``build_pretrain_stream`` (tokenise + mix + pack on the fly).
* plain: ``transformers.Trainer`` with ``default_data_collator`` over the same rows materialised
  as a list (``train_sampling_strategy="sequential"``, so the order is the stream's).

The two train side by side in two threads that take turns, ONE optimizer step each (only one runs
at a time), so drift in machine load hits both alike; ``--rounds`` repeats this with fresh models
from the same initial weights, alternating which trainer goes first. xlt gets a fresh stream each
round, so it pays its tokenisation and packing inside the steps, as in a real run. A step is timed
from the moment its trainer gets the turn (right after its previous ``on_step_end``) to its next
``on_step_end``: the previous step's log (``--logging-steps 1``, the default, so every step pays
xlt's token accounting), the batch fetch, forward, backward, clipping, optimizer and scheduler.
The first ``--warmup`` steps of every run are left out. ``overhead_ratio`` = the median, over
steps, of (xlt step i wall seconds / plain step i wall seconds): the two steps of a pair run back to
back, so load from other processes mostly hits both (on a shared machine the ratio of the two pooled
medians, also reported as ``overhead_ratio_of_medians``, swung from 0.99 to 1.07 between runs while
the paired ratio stayed within 1.00 +- 0.015). Also reported: the ratio of means (tokenisation
bursts of the stream show there) and of median process CPU seconds.
Identical losses step by step (``max_loss_diff``) check that both trained on the same batches.

    python bench/step_overhead.py [--hidden 256 --layers 4 --seq-len 256 --batch 2 --steps 30
                                   --warmup 3 --rounds 2 --threads 1] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHARED = os.environ.get("XLT_SHARED_DATA", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))
JA = os.path.join(SHARED, "ja_wiki_paragraphs.jsonl")
EN = os.path.join(SHARED, "en_tinyshakespeare.txt")


def data_args(seq_len: int):
    from xlt.config import DataArguments

    return DataArguments(sources=[{"name": "ja_wiki", "lang": "ja", "path": JA},
                                  {"name": "tiny_shakespeare", "lang": "en", "path": EN}],
                         seq_len=seq_len, ja_schedule="linear", ja_ratio_start=0.5, ja_ratio_end=0.9)


def make_model(tokenizer, ns, state_dict=None):
    """A random Llama with the tokenizer's vocabulary; ``state_dict`` makes it identical to another."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=ns.hidden, intermediate_size=ns.intermediate or 4 * ns.hidden,
                      num_hidden_layers=ns.layers, num_attention_heads=ns.heads, num_key_value_heads=ns.kv_heads,
                      max_position_embeddings=max(1024, ns.seq_len), tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.config.use_cache = False  # as run_cpt: a cache disables the packed (per-document) attention mask
    return model


def training_args(ns, out_dir: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir, max_steps=ns.steps, per_device_train_batch_size=ns.batch, gradient_accumulation_steps=1,
        learning_rate=3e-4, lr_scheduler_type="constant", logging_steps=ns.logging_steps, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=0,
        train_sampling_strategy="sequential")


def make_xlt_trainer(model, tokenizer, args, stream, seq_len: int, rows_per_step: int, spike_factor: float,
                     callbacks: list):
    """xlt's trainer exactly as ``run_cpt`` builds it (xlt.train.cpt.build_cpt_trainer): skip-step guard with its
    default rules (all-reduced loss / grad-norm z-scores, non-finite skip) plus ``spike_factor``, xlt state in
    checkpoints, token accounting, tokens/s and sequence length in every log, progress postfix."""
    from xlt.config import CptArguments
    from xlt.data.steps import StepPlan
    from xlt.train.cpt import build_cpt_trainer
    from xlt.train.skip_step import SkipStepGuard

    guard = SkipStepGuard.from_args(CptArguments(spike_factor=spike_factor))
    plan = StepPlan(seq_len, rows_per_step, 1, 1, args.max_steps)
    return build_cpt_trainer(model, tokenizer, args, stream, data_args(seq_len), plan, guard, callbacks)


def make_plain_trainer(model, tokenizer, args, rows: list, callbacks: list):
    from transformers import Trainer, default_data_collator

    return Trainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator,
                   processing_class=tokenizer, callbacks=callbacks)


class Baton:
    """Two trainers in two threads take turns, one optimizer step each (only one runs at a time)."""

    def __init__(self, order: tuple[str, str]):
        self.order, self.turn, self.done = order, order[0], set()
        self.cond = threading.Condition()

    def wait(self, me: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == me)

    def pass_on(self, me: str, finished: bool = False) -> None:
        with self.cond:
            if finished:
                self.done.add(me)
            other = self.order[1] if me == self.order[0] else self.order[0]
            self.turn = me if other in self.done else other
            self.cond.notify_all()


def step_timer(name: str, baton: Baton):
    """A callback timing each optimizer step (wall and process CPU), then handing the turn over.

    A step is timed from the moment its trainer gets the turn (right after its previous
    ``on_step_end``) to its next ``on_step_end``: the previous step's log, the batch fetch,
    forward, backward, clipping, optimizer and scheduler.
    """
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.wall: list[float] = []
            self.cpu: list[float] = []
            self._t0 = self._c0 = 0.0

        def _start(self):
            baton.wait(name)
            self._t0, self._c0 = time.perf_counter(), time.process_time()

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self._start()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            self.wall.append(time.perf_counter() - self._t0)
            self.cpu.append(time.process_time() - self._c0)
            baton.pass_on(name)
            self._start()

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            baton.pass_on(name, finished=True)

    return StepTimer()


def materialise_rows(ns, tokenizer) -> list[dict]:
    """The rows xlt's stream yields for the run, as a list (the plain Trainer's dataset)."""
    from xlt.data.stream import LANG_KEY, build_pretrain_stream

    stream = build_pretrain_stream(data_args(ns.seq_len), tokenizer, ns.steps * ns.batch * ns.seq_len, ns.batch)
    rows = []
    for row in stream:
        rows.append({k: v.clone() for k, v in row.items() if k != LANG_KEY})  # the model's inputs only
        if len(rows) == ns.steps * ns.batch:
            return rows
    raise RuntimeError("the stream ended early")


def run_lockstep(ns, tokenizer, init_state, rows, tmp: str, order: tuple[str, str]) -> dict[str, dict]:
    """Train xlt's and the plain trainer side by side, alternating step by step."""
    from xlt.data.stream import build_pretrain_stream

    baton = Baton(order)
    trainers, timers = {}, {}
    for kind in order:  # everything is built before any timing starts
        model = make_model(tokenizer, ns, init_state)
        args = training_args(ns, os.path.join(tmp, kind))
        timers[kind] = step_timer(kind, baton)
        if kind == "xlt":
            stream = build_pretrain_stream(data_args(ns.seq_len), tokenizer, ns.steps * ns.batch * ns.seq_len, ns.batch)
            trainers[kind] = make_xlt_trainer(model, tokenizer, args, stream, ns.seq_len, ns.batch, ns.spike_factor,
                                              [timers[kind]])
        else:
            trainers[kind] = make_plain_trainer(model, tokenizer, args, rows, [timers[kind]])
    errors: list[BaseException] = []

    def train(kind: str) -> None:
        try:
            trainers[kind].train()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            baton.pass_on(kind, finished=True)

    threads = [threading.Thread(target=train, args=(k,)) for k in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    out = {}
    for kind, trainer in trainers.items():
        logs = [h for h in trainer.state.log_history if "loss" in h]
        out[kind] = {"wall": timers[kind].wall, "cpu": timers[kind].cpu, "losses": [h["loss"] for h in logs],
                     "logged_tokens": [h.get("tokens_trained") for h in logs],
                     "skipped": getattr(getattr(trainer, "xlt_guard", None), "skipped", 0)}
    return out


def measure(ns) -> dict:
    import torch
    import transformers

    from xlt.models import load_tokenizer

    torch.set_num_threads(ns.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    tokenizer = load_tokenizer(ns.model)
    model0 = make_model(tokenizer, ns)
    n_params = sum(p.numel() for p in model0.parameters())  # the tied LM head counted once
    init_state = {k: v.clone() for k, v in model0.state_dict().items()}
    rows = materialise_rows(ns, tokenizer)
    runs: dict[str, list[dict]] = {"xlt": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(ns.rounds):
            order = ("xlt", "plain") if r % 2 == 0 else ("plain", "xlt")
            for kind, run in run_lockstep(ns, tokenizer, init_state, rows, tmp, order).items():
                runs[kind].append(run)
    w = ns.warmup
    wall = {k: [t for run in v for t in run["wall"][w:]] for k, v in runs.items()}
    cpu = {k: [t for run in v for t in run["cpu"][w:]] for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in wall.items()}
    mean = {k: statistics.fmean(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    paired = [x / p for x, p in zip(wall["xlt"], wall["plain"], strict=True)]  # adjacent in time
    loss_x, loss_p = runs["xlt"][0]["losses"], runs["plain"][0]["losses"]
    tokens_per_step = ns.batch * ns.seq_len
    return {
        "overhead_ratio": round(statistics.median(paired), 4),
        "overhead_ratio_of_medians": round(med["xlt"] / med["plain"], 4),
        "overhead_ratio_mean": round(mean["xlt"] / mean["plain"], 4),
        "overhead_ratio_cpu": round(med_cpu["xlt"] / med_cpu["plain"], 4),
        "xlt_median_step_seconds": round(med["xlt"], 5), "plain_median_step_seconds": round(med["plain"], 5),
        "xlt_mean_step_seconds": round(mean["xlt"], 5), "plain_mean_step_seconds": round(mean["plain"], 5),
        "xlt_median_step_cpu_seconds": round(med_cpu["xlt"], 5), "plain_median_step_cpu_seconds": round(med_cpu["plain"], 5),
        "xlt_tokens_per_second": round(tokens_per_step / med["xlt"], 1),
        "plain_tokens_per_second": round(tokens_per_step / med["plain"], 1),
        "steps_timed": len(wall["xlt"]), "steps_per_run": ns.steps, "warmup_steps": w, "rounds": ns.rounds,
        "tokens_per_step": tokens_per_step, "seq_len": ns.seq_len, "batch": ns.batch,
        "logging_steps": ns.logging_steps, "threads": ns.threads,
        "params": n_params,
        "model": {"hidden": ns.hidden, "layers": ns.layers, "heads": ns.heads, "kv_heads": ns.kv_heads,
                  "intermediate": ns.intermediate or 4 * ns.hidden, "vocab": len(tokenizer)},
        "spike_factor": ns.spike_factor, "xlt_skipped_steps": sum(r["skipped"] for r in runs["xlt"]),
        # same weights, same batches, same order -> the same losses (CPU float32 is deterministic here)
        "max_loss_diff": max((abs(a - b) for a, b in zip(loss_x, loss_p, strict=True)), default=None),
        "xlt_logs_token_accounting": all(t == (i + 1) * tokens_per_step * ns.logging_steps
                                         for i, t in enumerate(runs["xlt"][0]["logged_tokens"])),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="tokenizer (vocabulary) of this model spec")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=0, help="MLP width (default 4 x hidden)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2, help="rows per step (per device, no accumulation)")
    ap.add_argument("--steps", type=int, default=30, help="steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="steps of each run left out of the timing")
    ap.add_argument("--rounds", type=int, default=2, help="lockstep runs (the first step alternates between them)")
    ap.add_argument("--logging-steps", type=int, default=1, help="1: every step pays xlt's log accounting")
    ap.add_argument("--spike-factor", type=float, default=3.0, help="xlt's loss-spike guard (enabled)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on a shared machine)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ns = ap.parse_args(argv)
    if ns.steps <= ns.warmup:
        ap.error("--steps must exceed --warmup")
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs; stdout keeps only the result
        r = measure(ns)
    if ns.json:
        print(json.dumps(r))
        return 0
    print(f"random Llama {r['params']:,} params (hidden {ns.hidden}, {ns.layers} layers, vocab {r['model']['vocab']:,}); "
          f"seq_len {ns.seq_len} x batch {ns.batch} = {r['tokens_per_step']:,} tokens/step; {ns.threads} thread(s)")
    print(f"{ns.rounds} lockstep run(s) of {ns.steps} steps, one step each in turn; first {ns.warmup} of each left out: "
          f"{r['steps_timed']} timed steps each; log every {ns.logging_steps} step(s)")
    print(f"{'trainer':<42} {'median s/step':>13} {'mean s/step':>12} {'median CPU s':>13} {'tokens/s':>9}")
    for name, p in (("xlt (stream + guard + accounting)", "xlt"), ("transformers Trainer (materialised rows)", "plain")):
        print(f"{name:<42} {r[p + '_median_step_seconds']:>13.4f} {r[p + '_mean_step_seconds']:>12.4f} "
              f"{r[p + '_median_step_cpu_seconds']:>13.4f} {r[p + '_tokens_per_second']:>9,.0f}")
    print(f"overhead ratio (median of paired steps, wall): {r['overhead_ratio']:.3f}; of medians "
          f"{r['overhead_ratio_of_medians']:.3f}; of means {r['overhead_ratio_mean']:.3f}; CPU {r['overhead_ratio_cpu']:.3f}")
    print(f"same batches: max loss difference {r['max_loss_diff']}; xlt skipped steps {r['xlt_skipped_steps']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
