"""Distillation from the base model early in continued pretraining (xlt/train/kd.py)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from conftest import REPO, tiny_llama
from xlt.config import CptArguments, XltError
from xlt.tokenizer.embeddings import expand_ids
from xlt.train.kd import Aligner, Distiller, KdSettings, kd_settings, kd_sum

OLD = 10                                # old ids 0..9
PIECES = {10: [3, 4], 11: [5, 6, 7]}    # new ids -> old pieces


def _packed_row():
    """Two packed documents (positions restart at 0; the second's first label is -100), as xlt/data/packing.py."""
    ids = torch.tensor([[1, 10, 2, 11, 9, 1, 10, 2]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])
    labels = ids.clone()
    labels[0, 0] = labels[0, 5] = -100
    return ids, pos, labels


def test_alignment_expands_new_ids_and_pairs_each_token_with_its_last_piece():
    ids, pos, labels = _packed_row()
    # A second row with no new id: a shorter teacher row, padded after its real tokens.
    ids = torch.cat([ids, torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])])
    pos = torch.cat([pos, torch.arange(8)[None]])
    labels = torch.cat([labels, torch.tensor([[-100, 2, 3, 4, 5, 6, 7, 8]])])
    b = Aligner(PIECES, rows=12).align(ids, labels, pos)
    assert b.input_ids[0].tolist() == expand_ids(ids[0].tolist(), PIECES) == [1, 3, 4, 2, 5, 6, 7, 9, 1, 3, 4, 2]
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]  # per document, counting pieces
    assert b.input_ids[1, :8].tolist() == ids[1].tolist()
    assert b.position_ids[1].tolist() == list(range(8)) + [0, 1, 2, 3]  # padding: its own segment after the row
    pairs = sorted(zip(b.student[0].tolist(), b.student[1].tolist(), b.teacher[0].tolist(), b.teacher[1].tolist()))
    # Row 0: token i (student position i) ends at the teacher position of its last piece; position 4 (EOS, whose
    # next label is the second document's -100) is not scored.
    assert [(i, t) for r, i, _, t in pairs if r == 0] == [(0, 0), (1, 2), (2, 3), (3, 6), (5, 8), (6, 10)]
    assert [(i, t) for r, i, _, t in pairs if r == 1] == [(i, i) for i in range(7)]


def test_teacher_reads_each_packed_document_as_if_alone():
    """The teacher's logits at the aligned positions of the packed row equal those of each document's expansion
    run on its own: no attention across the document boundary, positions from 0 per document (as the Distiller
    runs it: no cache, so transformers reads the segments from position_ids)."""
    teacher = tiny_llama(OLD, tie=False, seed=4).eval()
    ids, pos, labels = _packed_row()
    b = Aligner(PIECES, rows=12).align(ids, labels, pos)
    with torch.no_grad():
        packed = teacher(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False).logits[0]
        doc1 = teacher(input_ids=torch.tensor([expand_ids([1, 10, 2, 11, 9], PIECES)])).logits[0]
        doc2 = teacher(input_ids=torch.tensor([expand_ids([1, 10, 2], PIECES)])).logits[0]
    torch.testing.assert_close(packed[:8], doc1)
    torch.testing.assert_close(packed[8:], doc2)


def test_kd_is_zero_for_the_same_distribution_over_old_ids_and_a_scaled_kl_otherwise():
    torch.manual_seed(0)
    ids, pos, labels = _packed_row()
    b = Aligner(PIECES, rows=12).align(ids, labels, pos)
    teacher = torch.randn(1, 12, OLD)
    old = torch.arange(OLD)
    # The student's logits over the old ids equal the teacher's (shifted by a constant: same softmax); its new
    # columns hold anything. Restricted and renormalised over the old ids, the term is 0.
    student = torch.randn(1, 8, 12) * 5
    student[0, b.student[1], :OLD] = teacher[0, b.teacher[1]] + 3.0
    assert abs(float(kd_sum(student, teacher, b, old, temperature=2.0))) < 1e-5
    # Otherwise: T^2 x the summed KL of the temperature softmaxes over the old ids.
    student = torch.randn(1, 8, 12, requires_grad=True)
    got = kd_sum(student, teacher, b, old, temperature=2.0)
    want = 0.0
    for i, t in zip(b.student[1].tolist(), b.teacher[1].tolist()):
        p = torch.softmax(teacher[0, t] / 2, -1)
        q = torch.softmax(student[0, i, :OLD].detach() / 2, -1)
        want += float((p * (p.log() - q.log())).sum()) * 4
    assert want > 0.1 and abs(float(got.detach()) - want) < 1e-4
    got.backward()
    assert student.grad[0, :, OLD:].abs().sum() == 0  # new columns: no gradient (not in the distribution)
    assert student.grad[0, 4].abs().sum() == 0  # the unscored position (before the document boundary)


def test_identity_match_student_equal_to_teacher_gives_zero():
    """tokenizer_mode none: same vocabulary; a student identical to the teacher gets a zero term."""
    teacher = tiny_llama(OLD, seed=5).eval()
    student = tiny_llama(OLD, seed=5)
    d = Distiller(KdSettings(1.0, 2, identity=True), teacher, None, None, n_teacher=1)
    ids, pos, labels = _packed_row()
    ids = ids.clamp(max=OLD - 1)
    inputs = {"input_ids": ids, "position_ids": pos, "labels": labels}
    total, n = d.kd_sum(student(input_ids=ids, position_ids=pos, use_cache=False).logits, inputs)
    assert n == 6 and abs(float(total.detach())) < 1e-6 and d.local_tokens == ids.numel()


# -- settings ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, key", [({"kd_weight": -1.0}, "kd_weight"), ({"kd_weight": float("inf")}, "kd_weight"),
                                     ({"kd_fraction": 0.0}, "kd_fraction"), ({"kd_fraction": 1.5}, "kd_fraction"),
                                     ({"kd_temperature": 0.0}, "kd_temperature")])
def test_recipe_keys_are_range_checked(kw, key):
    with pytest.raises(XltError, match=key) as e:
        CptArguments(**kw)
    assert "\n" not in str(e.value)


def test_settings_window_and_refusals():
    c = CptArguments(kd_weight=0.5, kd_fraction=0.1)
    s = kd_settings(c, "extend", 25)
    assert s.steps == 3 and [s.active_at(k) for k in (0, 2, 3)] == [True, True, False]  # ceil(2.5)
    assert kd_settings(CptArguments(), "extend", 25) is None
    assert kd_settings(c, "none", 25).identity
    for args, kwargs, msg in ((("swap", 25), {}, "tokenizer_mode swap"), (("extend", 25), {"use_lora": True}, "use_lora"),
                              (("extend", 25), {"launcher_kind": "deepspeed"}, "deepspeed")):
        with pytest.raises(XltError, match=f"kd_weight.*{msg}"):
            kd_settings(c, *args, **kwargs)
    assert kd_settings(c, "extend", 25, launcher_kind="fsdp").steps == 3  # the teacher is sharded too


def test_bad_keys_fail_before_any_model_loads(tmp_path, no_model_loading, capsys):
    from xlt.cli import run_recipe

    cpt = str(REPO / "recipes/smollm2-135m-ja/cpt.yaml")
    out = str(tmp_path / "r")
    assert run_recipe("cpt", ["--config", cpt, "--output_dir", out, "--kd_fraction", "0"]) == 2
    assert run_recipe("cpt", ["--config", cpt, "--output_dir", out, "--tokenizer_mode", "swap",
                              "--kd_weight", "1"]) == 2
    assert run_recipe("cpt", ["--config", cpt, "--output_dir", out, "--use_lora", "true", "--kd_weight", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "kd_fraction" in err[0] and "swap" in err[1] and "use_lora" in err[2]


# -- the real XltTrainer path -------------------------------------------------------------------
def _cpt_args(model, out, *extra):
    return ["--config", str(REPO / "recipes/smollm2-135m-ja/cpt.yaml"), "--model", model, "--output_dir", out,
            "--new_tokens", "64", "--train_tokens", "4096", "--eval_max_docs", "8", "--logging_steps", "1",
            "--save_steps", "1", "--save_total_limit", "10", "--warmup_steps", "1", "--loss_by_language_steps", "0",
            "--kd_weight", "2.0", "--kd_fraction", "0.4", *extra]


def _recording_trainer(record):
    """A subclass of cpt.CptTrainer recording each micro-batch's training loss, its plain LM loss (the Trainer's
    own compute_loss on the same inputs) and input ids, by global step; the trainer itself in ``record['trainer']``.
    Returns (the cpt module, the original class, the recording class)."""
    from transformers import Trainer

    import xlt.train.cpt as cpt_module
    from xlt.data.stream import LANG_KEY

    original = cpt_module.CptTrainer

    class Recording(original):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            record["trainer"] = self

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            clean = {k: v for k, v in inputs.items() if k != LANG_KEY}
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            with torch.no_grad():
                lm = Trainer.compute_loss(self, model, dict(clean), num_items_in_batch=num_items_in_batch)
            record["steps"].append((self.state.global_step, float(loss.detach()), float(lm), clean["input_ids"].clone()))
            return loss

    return cpt_module, original, Recording


def test_kd_in_a_real_run_window_loss_flops_and_resume(tmp_path, tiny_model_dir, capsys):
    """4 steps, the first ceil(0.4 x 4) = 2 with the term: there the loss exceeds the plain LM loss of the same
    batch, afterwards it equals it and the teacher is gone; kd_loss is logged in the window only; report.json's
    cpt.distill_flops = 2 x N_eff(base) x the tokens the teacher read (each window batch expanded, padded to its
    longest row). Interrupted after step 1 and resumed: the same weights and the same distill_flops."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import TrainerCallback

    from xlt.cli import run_recipe
    from xlt.compare import model_effective_params

    record = {"steps": []}
    cpt_module, original, patched = _recording_trainer(record)
    full = str(tmp_path / "full")
    cpt_module.CptTrainer = patched
    try:
        assert run_recipe("cpt", _cpt_args(tiny_model_dir, full)) == 0
    finally:
        cpt_module.CptTrainer = original
    log = capsys.readouterr().out
    assert "distillation from the base model: weight 2, temperature 1, first 2 of 4 steps" in log
    assert "loss chunked (the distillation window's steps: model, from the logits)" in log
    steps = record["steps"]
    assert sorted({s for s, *_ in steps}) == [0, 1, 2, 3]
    for step, loss, lm, _ in steps:
        if step < 2:
            assert loss > lm + 1e-3, (step, loss, lm)
        else:
            assert loss == pytest.approx(lm, abs=1e-6), (step, loss, lm)
    trainer = record["trainer"]
    assert trainer.xlt_kd.teacher is None
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert "kd_loss" in logged[1] and "kd_loss" in logged[2] and logged[1]["kd_loss"] > 0
    assert "kd_loss" not in logged[3] and "kd_loss" not in logged[4]

    # The teacher's tokens, recomputed from the batches with the base tokenizer's pieces of every new token.
    base = Tokenizer.from_file(os.path.join(tiny_model_dir, "tokenizer.json"))
    new = Tokenizer.from_file(os.path.join(full, "tokenizer", "tokenizer.json"))
    old_ids = set(base.get_vocab(with_added_tokens=True).values())
    pieces = {i: [t.id for t in base.model.tokenize(s)] for s, i in new.get_vocab().items() if i not in old_ids}
    assert pieces
    tokens = 0
    for step, _, _, ids in steps:
        if step < 2:
            tokens += ids.shape[0] * max(len(expand_ids(r, pieces)) for r in ids.tolist())
    n_eff = model_effective_params(tiny_model_dir)["n_eff"]
    with open(os.path.join(full, "report.json"), encoding="utf-8") as f:
        cpt = json.load(f)["cpt"]
    assert tokens > 4096 // 2  # expanded: more old tokens than new
    assert cpt["kd"]["teacher_tokens"] == tokens and cpt["distill_flops"] == 2 * n_eff * tokens
    assert f"distillation: {tokens:,} teacher tokens" in log

    class StopAt1(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step >= 1:
                raise KeyboardInterrupt

    class Interrupted(original):
        def __init__(self, *a, **k):
            k["callbacks"] = list(k.get("callbacks") or []) + [StopAt1()]
            super().__init__(*a, **k)

    part = str(tmp_path / "part")
    cpt_module.CptTrainer = Interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            run_recipe("cpt", _cpt_args(tiny_model_dir, part))
    finally:
        cpt_module.CptTrainer = original
    assert run_recipe("cpt", _cpt_args(tiny_model_dir, part)) == 0
    with open(os.path.join(part, "report.json"), encoding="utf-8") as f:
        assert json.load(f)["cpt"]["distill_flops"] == cpt["distill_flops"]
    a = load_file(os.path.join(full, "cpt", "model.safetensors"))
    b = load_file(os.path.join(part, "cpt", "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert math.isfinite(cpt["train_loss"])
