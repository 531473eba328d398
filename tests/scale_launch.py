"""Launched by tests/test_scale.py in subprocesses (torchrun / plain python): one mode per scenario.

    python tests/scale_launch.py fsdp_save OUT_DIR MODEL_DIR        (under torchrun, 2 gloo processes)
    python tests/scale_launch.py replicas OUT_DIR MODEL_DIR         (under torchrun, 2 gloo processes)
    python tests/scale_launch.py fsdp_kd OUT_DIR MODEL_DIR          (under torchrun, 2 gloo processes)
    python tests/scale_launch.py cpt_pause MARKER -- CPT_ARGS...     (pauses inside step 1 after writing MARKER)
    python tests/scale_launch.py recipe_teardown OUT_DIR MODEL_DIR  (under torchrun: a recipe stage's process group
                                                                      is gone when run_recipe returns)
    python tests/scale_launch.py cpt_sigkill STEP -- CPT_ARGS...     (SIGKILLs itself mid-step STEP: after the
                                                                      backward pass, before the optimizer step)
    python tests/scale_launch.py cpt_rank_local_skip STEP CPT_ARGS...  (under accelerate launch, 2 processes:
                                                                      rank 1 alone drops optimizer step STEP)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def fsdp_save(out: str, model_dir: str) -> None:
    """FSDP2 (torch fully_shard) on gloo: the gathered save writes a loadable model equal to the full weights."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xlt.train.distributed import replicas_in_sync, save_final_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(rank))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    result: dict = {"replicas_in_sync": replicas_in_sync(model)}
    # (The old path, save_pretrained of the sharded module on rank 0 alone, either raises or deadlocks waiting
    # for the other rank's all-gather: it cannot be run here as a control.)
    save_final_model(model, tok, os.path.join(out, "final"))
    if rank == 0:
        reloaded = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"))
        sd = reloaded.state_dict()
        result["max_abs_diff"] = max(float((sd[n] - t).abs().max()) for n, t in full.items())
        result["keys_missing"] = sorted(set(full) - set(sd))
        with open(os.path.join(out, "result.json"), "w", encoding="utf-8") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def fsdp_lora_save(out: str, model_dir: str) -> None:
    """LoRA (trainable new rows) sharded with fully_shard: the gathered, merged save equals merge_and_unload."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xlt.train.distributed import save_final_model
    from xlt.train.lora import LoraSettings, apply_lora

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = model.get_input_embeddings().weight.shape[0]
    peft_model = apply_lora(model, LoraSettings(use_lora=True, lora_r=4, lora_alpha=8), list(range(rows - 8, rows)))
    for layer in peft_model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(peft_model)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(rows - 8, rows, (2, 16), generator=torch.Generator().manual_seed(rank))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    trained = get_model_state_dict(peft_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    save_final_model(peft_model, tok, os.path.join(out, "final"))
    if rank == 0:
        from safetensors.torch import load_file

        saved = load_file(os.path.join(out, "final", "model.safetensors"))
        emb = saved["model.embed_tokens.weight"]
        base = AutoModelForCausalLM.from_pretrained(model_dir).get_input_embeddings().weight
        # The reference: the same trained adapter on an unsharded copy, merged by peft's merge_and_unload.
        ref = apply_lora(AutoModelForCausalLM.from_pretrained(model_dir),
                         LoraSettings(use_lora=True, lora_r=4, lora_alpha=8), list(range(rows - 8, rows)))
        ref.load_state_dict(trained)
        merged = ref.merge_and_unload().state_dict()
        result = {"old_rows_equal": bool(torch.equal(emb[: rows - 8], base[: rows - 8])),
                  "new_rows_changed": not torch.equal(emb[rows - 8:], base[rows - 8:]),
                  "keys": sorted(saved)[:3], "lora_keys": [k for k in saved if "lora" in k],
                  "keys_not_in_merge_and_unload": sorted(set(saved) - set(merged)),
                  "merge_and_unload_keys_not_saved": sorted(set(merged) - set(saved) - {"lm_head.weight"}),
                  "max_abs_diff_vs_merge_and_unload": max(
                      float((saved[k].float() - merged[k].float()).abs().max()) for k in saved if k in merged)}
        with open(os.path.join(out, "lora.json"), "w", encoding="utf-8") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def fsdp_kd(out: str, model_dir: str) -> None:
    """The distillation term with the teacher sharded (FSDP launch) equals the one with a full teacher copy, for a
    student sharded with fully_shard; each process holds half the teacher; the term's gradient reaches the student."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from xlt.train.kd import Distiller, KdSettings

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    student = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():  # a student that differs from the teacher, so the term is not zero
        for p in student.parameters():
            p.mul_(1.5)
    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student)
    settings = KdSettings(weight=1.0, steps=2, temperature=2.0, identity=True)
    rows = int(student.get_input_embeddings().weight.shape[0])
    sharded = Distiller.build(settings, model_dir, model_dir, rows, "float32", "sdpa", shard=True)
    full = Distiller.build(settings, model_dir, model_dir, rows, "float32", "sdpa")
    ids = torch.randint(0, rows, (2, 24), generator=torch.Generator().manual_seed(rank))
    labels = ids.clone()
    labels[:, 0] = -100
    inputs = {"input_ids": ids, "labels": labels,
              "position_ids": torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)}  # two packed docs
    logits = student(input_ids=ids, position_ids=inputs["position_ids"]).logits
    term, n = sharded.kd_sum(logits, inputs)
    ref, n_ref = full.kd_sum(logits.detach(), inputs)
    term.backward()
    params = list(sharded.teacher.parameters())
    local = sum(p.to_local().numel() for p in params if isinstance(p, DTensor))
    result = {"term": float(term), "ref": float(ref), "n": n, "n_ref": n_ref,
              "all_dtensor": all(isinstance(p, DTensor) for p in params),
              "local_share": local / sum(p.numel() for p in params),
              "student_grad": all(p.grad is not None and bool(torch.isfinite(p.grad.full_tensor()).all())
                                  for p in student.parameters())}
    with open(os.path.join(out, f"kd-{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def replicas(out: str, model_dir: str) -> None:
    """DDP replicas: equal -> True; one rank's weight nudged by one ulp -> the check stops on every rank."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from xlt.config import XltError
    from xlt.train.distributed import check_replicas, replicas_in_sync

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    result: dict = {"equal": replicas_in_sync(model)}
    if rank == 1:
        with torch.no_grad():
            w = model.model.layers[1].mlp.down_proj.weight
            w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(float("inf")))
    try:
        check_replicas(model, None, step=7)
        result["nudged"] = "no error"
    except XltError as e:
        result["nudged"] = str(e)
    with open(os.path.join(out, f"replicas-{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def _patched_cpt(hook) -> int:
    """Run ``xlt cpt`` with ``hook(trainer)`` called inside every training step, after the backward pass."""
    import xlt.train.cpt as cpt_module
    from xlt.cli import run_recipe

    class Hooked(cpt_module.CptTrainer):
        def training_step(self, *a, **k):
            loss = super().training_step(*a, **k)
            hook(self)
            return loss

    cpt_module.CptTrainer = Hooked
    return run_recipe("cpt", sys.argv[sys.argv.index("--") + 1:])


def cpt_pause(marker: str) -> int:
    def hook(trainer) -> None:
        if trainer.state.global_step == 1 and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(120)

    return _patched_cpt(hook)


def cpt_sigkill(step: int) -> int:
    def hook(trainer) -> None:
        if trainer.state.global_step == step:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return _patched_cpt(hook)


def cpt_rank_local_skip(step: int, argv: list[str]) -> int:
    """``xlt cpt`` where the spike guard's verdict on optimizer step ``step`` is "skip" on rank 1 only: a decision
    taken on one rank, which leaves that replica's weights behind the other's (the divergence the replica check
    at every save exists to stop). The guard's all-reduce still runs on both ranks, so no collective is missed."""
    import dataclasses

    from xlt.cli import run_recipe
    from xlt.train import skip_step

    decide = skip_step.SkipStepGuard.decide

    def rank_local(self, loss, grad_norm, nonfinite, at=None):  # noqa: ANN001 - SkipStepGuard.decide's signature
        verdict = decide(self, loss, grad_norm, nonfinite, at)
        if os.environ.get("RANK") == "1" and self.decisions == step:
            return dataclasses.replace(verdict, skip=True, reason="rank 1 alone")
        return verdict

    skip_step.SkipStepGuard.decide = rank_local
    return run_recipe("cpt", argv)


def recipe_teardown(out: str, model_dir: str) -> None:
    """A stage that leaves a gloo group with an async FSDP2-style collective behind (as a Trainer does): when
    ``run_recipe`` returns, the group is destroyed on every rank."""
    import torch
    import torch.distributed as dist

    import xlt.cli as cli
    import xlt.stages

    def stage(argv) -> int:
        dist.init_process_group("gloo")
        work = dist.all_reduce(torch.ones(4), async_op=True)
        work.wait()
        return 0

    xlt.stages.recipe_stage = lambda name: stage
    rc = cli.run_recipe("cpt", [])
    result = {"rc": rc, "initialized_after": dist.is_initialized()}
    with open(os.path.join(out, f"teardown-{os.environ['RANK']}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "recipe_teardown":
        recipe_teardown(sys.argv[2], sys.argv[3])
    elif mode == "fsdp_save":
        fsdp_save(sys.argv[2], sys.argv[3])
    elif mode == "fsdp_lora_save":
        fsdp_lora_save(sys.argv[2], sys.argv[3])
    elif mode == "fsdp_kd":
        fsdp_kd(sys.argv[2], sys.argv[3])
    elif mode == "replicas":
        replicas(sys.argv[2], sys.argv[3])
    elif mode == "cpt_pause":
        sys.exit(cpt_pause(sys.argv[2]))
    elif mode == "cpt_sigkill":
        sys.exit(cpt_sigkill(int(sys.argv[2])))
    elif mode == "cpt_rank_local_skip":
        sys.exit(cpt_rank_local_skip(int(sys.argv[2]), sys.argv[3:]))
    else:
        raise SystemExit(f"unknown mode {mode}")
