"""The LM loss from the last hidden states (xlt/train/losses.py): the model's own loss and gradients, the
per-language sums, a bounded peak (no batch x positions x vocabulary fp32 logits), and a CPT run that ends with the
model path's weights."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO, tiny_llama
from xlt.config import XltError
from xlt.train.losses import chunked_causal_lm_loss, resolve_loss_implementation

V, B, S = 300, 2, 40
SMALL_CHUNK = 16 * V  # 16 positions per chunk: 5 chunks over 2 x 40 positions


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, S), generator=g)
    labels = ids.clone()
    labels[:, 0] = -100
    labels[0, 17] = -100  # a segment start inside a packed row
    langs = (torch.rand(B, S, generator=g) < 0.4).long()
    return ids, labels, langs


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _hidden_loss(model, ids, labels, **kw):
    keep = torch.empty(0, dtype=torch.long)
    out = model(input_ids=ids, logits_to_keep=keep, output_hidden_states=True)
    assert out.logits.shape == (B, 0, V)  # the model projects no position itself
    return chunked_causal_lm_loss(out.hidden_states[-1], model.get_output_embeddings(), labels, V,
                                  chunk_elements=SMALL_CHUNK, **kw)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("num_items", [None, 123])
def test_chunked_loss_and_gradients_equal_the_models_own(tie, num_items):
    model = tiny_llama(V, tie=tie, hidden=32)
    ids, labels, _ = _batch()
    ref = model(input_ids=ids, labels=labels, num_items_in_batch=num_items).loss
    ref.backward()
    want = _grads(model)
    model.zero_grad()
    loss, _ = _hidden_loss(model, ids, labels, num_items_in_batch=num_items)
    loss.backward()
    got = _grads(model)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert set(got) == set(want) and (tie or "lm_head.weight" in got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("tie,new_rows", [(False, "trainable_tokens"), (True, "trainable_tokens"),
                                          (False, "modules_to_save")])
def test_chunked_loss_through_a_peft_model(tie, new_rows):
    """LoRA with trainable new rows: the head the forward calls is peft's wrapper; the chunked loss calls the same
    one, so the loss and the trainable gradients (LoRA B, the new rows) equal the model's own."""
    from xlt.train.lora import LoraSettings, apply_lora
    from xlt.train.losses import forward_hidden, output_head

    model = apply_lora(tiny_llama(V, tie=tie, hidden=32), LoraSettings(use_lora=True, lora_r=4, lora_new_rows=new_rows),
                       list(range(V - 8, V)))
    ids, labels, _ = _batch()
    ids[:, 5:9] = torch.arange(V - 4, V)  # the new rows are read and predicted
    labels[:, 5:9] = ids[:, 5:9]
    ref = model(input_ids=ids, labels=labels).loss
    ref.backward()
    want = _grads(model)
    model.zero_grad()
    loss, _ = chunked_causal_lm_loss(forward_hidden(model, {"input_ids": ids}), output_head(model), labels, V,
                                     chunk_elements=SMALL_CHUNK)
    loss.backward()
    got = _grads(model)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert set(got) == set(want) and any("lora_B" in n for n in got)
    assert any("token_adapter" in n or "modules_to_save" in n for n in got), sorted(got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_flattened_varlen_row_gives_the_models_loss():
    """A (1, sum S) row (the flash path's layout, -100 at each segment start): the model's own loss of that row."""
    model = tiny_llama(V, hidden=32)
    ids, labels, _ = _batch()
    ids, labels, position_ids = ids.reshape(1, -1), labels.reshape(1, -1), torch.arange(S).repeat(B)[None]
    flat_loss, _ = _hidden_loss_flat(model, ids, labels, position_ids)
    ref = model(input_ids=ids, labels=labels, position_ids=position_ids).loss
    torch.testing.assert_close(flat_loss, ref, rtol=1e-5, atol=1e-6)


def _hidden_loss_flat(model, ids, labels, position_ids):
    out = model(input_ids=ids, position_ids=position_ids, logits_to_keep=torch.empty(0, dtype=torch.long),
                output_hidden_states=True)
    return chunked_causal_lm_loss(out.hidden_states[-1], model.get_output_embeddings(), labels, V,
                                  chunk_elements=SMALL_CHUNK)


def test_per_language_sums_equal_loss_by_language():
    from xlt.train.losses import logits_language_sums

    model = tiny_llama(V, hidden=32)
    ids, labels, langs = _batch()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    want = logits_language_sums(logits, labels, langs, 2)
    _, got = _hidden_loss(model, ids, labels, langs=langs, n_langs=2)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[1], want[1]) and got[1].sum() == (labels[:, 1:] != -100).sum()


class LargestTensor(TorchDispatchMode):
    """The largest tensor (in elements) any op creates while the mode is on: the peak a loss can reach is bounded
    by what it allocates, so a path that never creates a batch x positions x vocabulary tensor never holds one."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_loss_never_creates_the_full_logits():
    model = tiny_llama(V, hidden=32)
    ids, labels, _ = _batch()
    params = max(p.numel() for p in model.parameters())  # the head / embedding (V x hidden) and its gradient
    with LargestTensor() as full:
        model(input_ids=ids, labels=labels).loss.backward()
    assert full.largest >= B * S * V  # the model's own loss: the whole logits (and their fp32 copy)
    model.zero_grad()
    with LargestTensor() as chunked:
        _hidden_loss(model, ids, labels)[0].backward()
    assert chunked.largest <= max(SMALL_CHUNK, params) < B * S * V


def test_loss_implementation_resolution():
    assert resolve_loss_implementation("auto", cuda=False, importable=lambda: True) == "chunked"
    assert resolve_loss_implementation("auto", cuda=True, importable=lambda: False) == "chunked"
    assert resolve_loss_implementation("auto", cuda=True, importable=lambda: True) == "liger"
    assert resolve_loss_implementation("model", cuda=True, importable=lambda: True) == "model"
    with pytest.raises(XltError, match=r"^loss_implementation=liger: needs liger-kernel on a CUDA GPU"):
        resolve_loss_implementation("liger", cuda=False, importable=lambda: True)


def test_bad_loss_implementation_is_one_line_before_any_work(tmp_path, capsys, no_model_loading):
    from xlt.cli import main

    rc = main(["cpt", "--config", str(REPO / "recipes/smollm2-135m-ja/cpt.yaml"), "--output_dir",
               str(tmp_path / "run"), "--loss_implementation", "fused"])
    err = capsys.readouterr().err
    assert rc != 0 and "loss_implementation='fused': expected auto, chunked, liger or model" in err


def test_cpt_run_with_the_chunked_loss_ends_with_the_model_paths_weights(tmp_path, tiny_model_dir, monkeypatch):
    from test_scale import cpt_args, weights

    import xlt.train.trainer as trainer
    from xlt.cli import run_recipe

    calls, real = [], trainer.chunked_causal_lm_loss
    monkeypatch.setattr(trainer, "chunked_causal_lm_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = {}
    for impl in ("model", "chunked"):
        out = str(tmp_path / impl)
        calls.clear()
        assert run_recipe("cpt", cpt_args(tiny_model_dir, out, "--loss_implementation", impl,
                                          "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                                          "--loss_by_language_steps", "2", "--logging_steps", "2")) == 0
        report = json.loads(open(os.path.join(out, "report.json"), encoding="utf-8").read())
        assert report["cpt"]["loss_implementation"] == impl
        state = json.loads(open(os.path.join(out, "checkpoint-6", "trainer_state.json"), encoding="utf-8").read())
        assert len(calls) == (0 if impl == "model" else 12)  # every micro-batch of the 6 steps
        runs[impl] = (weights(os.path.join(out, "cpt")), [h for h in state["log_history"] if "loss" in h])
    (a, logs_a), (b, logs_b) = runs["model"], runs["chunked"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert len(logs_a) == len(logs_b) == 3
    for x, y in zip(logs_a, logs_b):
        for key in ("loss", "loss_ja", "loss_en"):
            assert y[key] == pytest.approx(x[key], abs=2e-4), key


def _fsdp2_worker(rank: int, world: int, port: int, tie: bool, results) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from xlt.train.losses import forward_hidden, output_head

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        ids, labels, _ = _batch()  # the same batch on both ranks: FSDP2's averaged gradients are the batch's
        reference = tiny_llama(V, tie=tie, hidden=32)
        reference(input_ids=ids, labels=labels).loss.backward()
        model = tiny_llama(V, tie=tie, hidden=32)  # the same seed: the same weights
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)  # the root: embeddings, final norm, head
        loss, _ = chunked_causal_lm_loss(forward_hidden(model, {"input_ids": ids}), output_head(model), labels, V,
                                         chunk_elements=SMALL_CHUNK)
        loss.backward()
        worst = 0.0
        for (name, p), (ref_name, q) in zip(model.named_parameters(), reference.named_parameters()):
            assert name == ref_name
            full = p.grad.full_tensor()
            worst = max(worst, float((full - q.grad).abs().max() / (q.grad.abs().max() + 1e-12)))
        results[rank] = (float(loss), float(reference(input_ids=ids, labels=labels).loss), worst)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_loss_under_fsdp2_equals_the_unsharded_models(tie):
    """fully_shard per layer + root over 2 gloo processes: the hidden states come out of the root's forward, the
    head is called per chunk after it (and again in backward); the sharded gradients, gathered, equal the unsharded
    model's own."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_fsdp2_worker, args=(2, port, tie, results), nprocs=2, join=True)
    for rank in (0, 1):
        loss, ref, worst = results[rank]
        assert loss == pytest.approx(ref, rel=1e-5)
        assert worst < 1e-4, (rank, worst)
