"""Launched by tests/test_fsdp2.py in subprocesses: one mode per scenario.

    torchrun --nproc_per_node 2 tests/fsdp_launch.py new_rows_swap OUT_DIR
        The new-rows AdamW wrapper built on a tiny Llama before sharding; then what accelerate's FSDP2 ``prepare``
        does: ``fully_shard`` per layer + root, the optimizer's parameters swapped for the sharded DTensors
        (``fsdp2_switch_optimizer_parameters``); one backward; ``step()``. Writes ``OUT_DIR/swap-RANK.json``.
    accelerate launch ... tests/fsdp_launch.py probe OUT_DIR STAGE -- RECIPE_ARGS...
        ``run_recipe(STAGE, RECIPE_ARGS)`` with every reduce-scatter recorded (the micro-batch it ran in, its
        dtype) and, after each micro-batch, whether each trainable parameter holds a (sharded) gradient. Writes
        ``OUT_DIR/probe-RANK.json``.
"""

from __future__ import annotations

import json
import os
import sys


def new_rows_swap(out: str) -> None:
    import torch
    import torch.distributed as dist
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters
    from torch.distributed.fsdp import fully_shard

    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import tiny_llama
    from xlt.train.new_rows import NewRowsSettings, _local, embedding_matrices, wrap_new_rows

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = tiny_llama(96, tie=False)  # two embedding matrices (input and untied head), 48 rows per shard
    reference = tiny_llama(96, tie=False)  # the same weights, unsharded, with a plain AdamW per group
    new = list(range(40, 96))  # new rows on both shards: 40-47 on rank 0, 48-95 on rank 1
    settings = NewRowsSettings(lr_multiplier=10.0, weight_decay=0.0)
    opt = wrap_new_rows(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model, new, settings,
                        step_of=lambda: 0)
    # accelerate's _prepare_fsdp2: each optimizer parameter replaced by a placeholder keyed by the parameter's
    # identity, fully_shard, then fsdp2_switch_optimizer_parameters maps the keys to the sharded DTensors.
    names = {n: id(p) for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for i, p in enumerate(g["params"]):
            g["params"][i] = torch.empty(1, dtype=p.dtype)
            g["params"][i].data_ptr = id(p)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = dict(model.named_parameters())
    fsdp2_switch_optimizer_parameters(opt, {names[n]: sharded[n] for n in names})
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    result: dict = {}
    try:
        model(input_ids=ids[2 * rank: 2 * rank + 2], labels=ids[2 * rank: 2 * rank + 2]).loss.backward()
        opt.arm()
        opt.step()
        result["step"] = "ok"
    except Exception as e:  # noqa: BLE001 - the error is the result
        result["step"] = f"{type(e).__name__}: {e}"
    if result["step"] == "ok":
        ref_opt = _reference_adamw(reference, new, settings)
        reference(input_ids=ids, labels=ids).loss.backward()
        ref_opt.step()
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        want = dict(reference.named_parameters())
        result["max_abs_diff"] = max(float((full[n] - want[n]).abs().max()) for n in full)
        emb = embedding_matrices(model)
        result["embedding_is_dtensor"] = all(hasattr(w, "to_local") for w in emb)
        result["local_rows"] = [int(_local(w).shape[0]) for w in emb]
    with open(os.path.join(out, f"swap-{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def _reference_adamw(model, new: list[int], settings) -> object:
    """The reference the wrapper promises: the new rows as their own AdamW group, here as separate copies.

    One step from zero state on full (unsharded) weights, with the gradient of the whole batch; the new rows get
    lr x multiplier and their own weight decay. Implemented by stepping two AdamWs and merging rows.
    """
    import torch

    mats = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    rows = torch.tensor(new)

    class Merged:
        def step(self) -> None:
            old = [m.detach()[rows].clone() for m in mats]
            grads = [m.grad[rows].clone() for m in mats]
            base.step()
            with torch.no_grad():
                for m, o, g in zip(mats, old, grads):
                    p = torch.nn.Parameter(o.clone())
                    p.grad = g
                    torch.optim.AdamW([p], lr=1e-2 * settings.lr_multiplier,
                                      weight_decay=settings.weight_decay).step()
                    m[rows] = p.detach()

    return Merged()


def probe(out: str, stage: str, argv: list[str]) -> int:
    import torch.distributed as dist
    from transformers import TrainerCallback

    import xlt.train.cpt as cpt_module
    from xlt.cli import run_recipe

    rank = int(os.environ.get("RANK", "0"))
    micro = {"n": 0}
    events: dict = {"reduce_scatter": [], "grads_after_micro_batch": []}
    original_rs = dist.reduce_scatter_single

    def recording_rs(*args, **kwargs):  # noqa: ANN002, ANN003
        tensor = kwargs.get("input", args[1] if len(args) > 1 else None)
        events["reduce_scatter"].append([micro["n"], str(tensor.dtype).replace("torch.", "")])
        return original_rs(*args, **kwargs)

    dist.reduce_scatter_single = recording_rs

    class AfterMicroBatch(TrainerCallback):
        """on_substep_end: after every micro-batch but the last of a window (whose step ends it)."""

        def on_substep_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            params = [p for p in model.parameters() if p.requires_grad]
            events["grads_after_micro_batch"].append(sum(p.grad is not None for p in params))
            micro["n"] += 1

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            micro["n"] += 1

    original = cpt_module.CptTrainer

    class Probed(original):
        def __init__(self, *a, **k):
            k["callbacks"] = list(k.get("callbacks") or []) + [AfterMicroBatch()]
            super().__init__(*a, **k)

    cpt_module.CptTrainer = Probed
    rc = run_recipe(stage, argv)
    events["micro_batches"] = micro["n"]
    with open(os.path.join(out, f"probe-{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(events, f)
    return rc


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "new_rows_swap":
        new_rows_swap(sys.argv[2])
    elif mode == "probe":
        sep = sys.argv.index("--")
        sys.exit(probe(sys.argv[2], sys.argv[3], sys.argv[sep + 1:]))
    else:
        raise SystemExit(f"unknown mode {mode}")
