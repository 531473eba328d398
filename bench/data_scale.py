"""Benchmark: the data path at scale, on token shards written by ``xlt data prepare`` (xlt/data/prepare.py).

1. Prepare: the shared Japanese Wikipedia paragraphs and tiny Shakespeare, repeated ``--repeat`` times (each copy
   marked, so exact dedup keeps them) as local sources, tokenized with the embedded SmolLM2 tokenizer into shards
   by datatrove's local executor on 1 and on 2 processes: input characters per second of the whole prepare
   (both stages, process start-up included), and, so that scaling can be judged on a machine whose cores are busy
   with other jobs, the CPU seconds it used (this process and its workers, from ``getrusage``): characters per
   CPU second (equal on 1 and 2 processes = no work added by running in parallel, so the rate grows with the
   cores the processes get), the cores it actually got (CPU seconds / wall seconds), the wall-time ratio, and
   the 1-minute load average before and after.
2. Read: simulated ranks of the Llama-2-7B recipe's step (seq_len 4096, 512 rows = 2,097,152 tokens, its
   Japanese schedule and warmup; 100B tokens) build their own rows of one step from the shards by index
   (``ShardRows``). Per world size W: the fraction of the step's tokens rank 0 read from the shards (counted at the
   memory map) and its seconds; the data fraction of a step at W = 64 against a 7B step at 9.5K tokens/s per GPU.
3. Resume: a fresh reader (a relaunch) building rank 0's rows of its first step at 1% and at 90% of the run.

    python bench/data_scale.py [--repeat 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHARED = os.environ.get("XLT_SHARED_DATA", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                         "shared", "data"))
STEP_TOKENS, SEQ_LEN, RUN_TOKENS, GPU_TOKENS_PER_SECOND = 2_097_152, 4096, 100_000_000_000, 9_500
WORLDS = (1, 8, 64)


def write_corpus(folder: str, repeat: int) -> list[dict]:
    """The shared text as two local sources, ``repeat`` marked copies each."""
    with open(os.path.join(SHARED, "ja_wiki_paragraphs.jsonl"), encoding="utf-8") as f:
        ja = [json.loads(line)["text"] for line in f if line.strip()]
    with open(os.path.join(SHARED, "en_tinyshakespeare.txt"), encoding="utf-8") as f:
        en = [b.strip() for b in f.read().split("\n\n") if b.strip()]
    paths = {}
    for lang, docs in (("ja", ja), ("en", en)):
        paths[lang] = os.path.join(folder, f"{lang}.jsonl")
        with open(paths[lang], "w", encoding="utf-8") as f:
            for k in range(repeat):
                for d in docs:
                    f.write(json.dumps({"text": f"{d}\n({k})"}, ensure_ascii=False) + "\n")
    return [{"name": "ja-wiki", "lang": "ja", "path": paths["ja"]},
            {"name": "en-shakespeare", "lang": "en", "path": paths["en"]}]


def data_args(specs: list[dict]):
    """The Llama-2-7B recipe's schedule, warmup and cleaning on the local sources."""
    import yaml

    from xlt.config import DataArguments

    with open(os.path.join(os.path.dirname(__file__), "..", "recipes", "llama2-7b-ja", "cpt.yaml"), encoding="utf-8") as f:
        recipe = yaml.safe_load(f)
    keys = ("ja_schedule", "ja_ratio_start", "ja_ratio_end", "ja_ramp_fraction", "seq_len", "slw_min_len",
            "slw_fraction", "slw_schedule", "clean_nfkc", "clean_min_chars", "clean_dedup")
    return DataArguments(sources=specs, **{k: recipe[k] for k in keys})


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) and of its finished, waited-for children
    (datatrove's worker processes)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def measure_prepare(specs, args, tokenizer, root: str, processes: int, shard_bytes: int) -> dict:
    """Input characters, wall seconds and CPU seconds of one whole prepare on ``processes`` processes."""
    from xlt.data.prepare import prepare_data
    from xlt.data.sources import load_sources
    from xlt.models import resolve_model

    out = os.path.join(root, f"prepared-{processes}")
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    prepare_data(load_sources(specs), args, tokenizer, resolve_model("smollm2-135m"), out,
                 processes=processes, shard_bytes=shard_bytes)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    with open(os.path.join(out, "prepared.json"), encoding="utf-8") as f:
        chars = sum(json.load(f)["chars"].values())
    return {"chars": chars, "wall": wall, "cpu": cpu}


def prepare_figures(runs: dict[str, dict], load: tuple[float, float]) -> dict:
    """The prepare figures of ``--json`` from the measured runs (keys: processes)."""
    return {"prepare_chars_per_second": {p: round(r["chars"] / r["wall"], 1) for p, r in runs.items()},
            "prepare_chars_per_cpu_second": {p: round(r["chars"] / r["cpu"], 1) for p, r in runs.items()},
            "prepare_cores_used": {p: round(r["cpu"] / r["wall"], 3) for p, r in runs.items()},
            "prepare_wall_ratio_1_over_2": round(runs["1"]["wall"] / runs["2"]["wall"], 3),
            # 1.0: two processes do the work of one per CPU second each, so with a free core each the rate doubles
            "prepare_cpu_efficiency_2_vs_1": round((runs["2"]["chars"] / runs["2"]["cpu"])
                                                   / (runs["1"]["chars"] / runs["1"]["cpu"]), 3),
            "load_average": {"before": round(load[0], 2), "after": round(load[1], 2)}}


class CountingData:
    """A ``PreparedData`` whose token reads are counted (tokens copied out of the memory maps)."""

    def __init__(self, data):
        self.data, self.read = data, 0
        self.docs, self.langs = data.docs, data.langs

    def tokens(self, name, doc, offset, n):
        out = self.data.tokens(name, doc, offset, n)
        self.read += len(out)
        return out


def reader(prepared: str, args):
    from xlt.data.shards import PreparedData, ShardRows

    data = CountingData(PreparedData(prepared))
    return data, ShardRows(data, args, RUN_TOKENS, STEP_TOKENS // SEQ_LEN, {n: 1.0 for n in data.langs})


def rank_step(rows, data, step: int, world: int) -> tuple[float, int]:
    """(seconds, tokens read) for rank 0 to build its rows of ``step``."""
    read, t0 = data.read, time.perf_counter()
    for g in rows.rank_rows(step, 0, world):
        rows.row(g)
    return time.perf_counter() - t0, data.read - read


def resume_seconds(prepared: str, args, step: int) -> float:
    """A relaunch at ``step``: a fresh reader (index files, the epoch's order) and rank 0's rows of that step."""
    t0 = time.perf_counter()
    data, rows = reader(prepared, args)
    rank_step(rows, data, step, 8)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=8, help="marked copies of the shared text (corpus size)")
    ap.add_argument("--json", action="store_true")
    ns = ap.parse_args()
    from xlt.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    with tempfile.TemporaryDirectory() as root:
        specs = write_corpus(root, ns.repeat)
        args = data_args(specs)
        shard_bytes = max(1, sum(os.path.getsize(s["path"]) for s in specs) // 8)  # about 8 shards
        load0 = os.getloadavg()[0]
        prepare = {str(p): measure_prepare(specs, args, tokenizer, root, p, shard_bytes) for p in (1, 2)}
        prepare_out = prepare_figures(prepare, (load0, os.getloadavg()[0]))
        prepared = os.path.join(root, "prepared-1")
        data, rows = reader(prepared, args)
        rank_step(rows, data, 1, 1)  # warm: page cache, the epoch's order
        read, seconds = {}, {}
        for w in WORLDS:  # steady state: the median of 3 steps of a running reader
            runs = [rank_step(rows, data, step, w) for step in (2, 3, 4)]
            seconds[str(w)] = sorted(t for t, _ in runs)[1]
            read[str(w)] = max(n for _, n in runs) / STEP_TOKENS
        steps = RUN_TOKENS // STEP_TOKENS
        resume = {name: resume_seconds(prepared, args, int(steps * f)) for name, f in (("early", 0.01), ("late", 0.9))}
    out = {"read_fraction_per_rank": read, "rank_seconds_per_step": {k: round(v, 4) for k, v in seconds.items()},
           "data_fraction_of_step_at_64": round(seconds["64"] / (STEP_TOKENS / 64 / GPU_TOKENS_PER_SECOND), 5),
           "resume_seconds": {k: round(v, 4) for k, v in resume.items()}, **prepare_out}
    if ns.json:
        print(json.dumps(out))
        return
    for k, v in out.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
