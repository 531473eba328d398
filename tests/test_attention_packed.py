"""Per-document attention for packed rows on every attention path, flash included, on a CPU.

flash-attn needs a GPU, so its kernels are replaced by a pure-torch stand-in with the same semantics
(``flash_attn_varlen_func``: causal attention inside each ``cu_seqlens`` segment; ``flash_attn_func``: one
causal sequence per row). Only the kernels are replaced: the model calls transformers' own
``flash_attention_forward`` through the attention interface, so position ids, ``cu_seq_lens_*`` and the
packed-sequence detection go the way they go on a GPU. transformers' availability checks are never asked:
the model is built with eager attention and its config then names the flash implementation, which is all the
attention layers read at each forward.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO, tiny_llama
from xlt.data.packing import RowBuilder
from xlt.data.stream import LANG_KEY

SEQ = 48
VOCAB = 96
# Two rows of pieces (language index, length); the first piece of row 2 continues the last document of row 1.
ROWS = [[(0, 11), (1, 20), (0, 17)], [(0, 9), (1, 5), (1, 30), (0, 4)]]
KERNEL_CALLS: list[str] = []  # which stand-in kernel each attention layer ran


# -------------------------------------------------------------------------------------------------------------
# The stand-in kernels
# -------------------------------------------------------------------------------------------------------------
def _causal(q, k, v, scale):
    """(L, H, D) queries against (L, H_kv, D) keys/values, causal, grouped-query heads repeated."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                           is_causal=True, scale=scale)
    return out.transpose(0, 1)


def torch_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                                 dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                 alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
    """flash_attn_varlen_func on (total, H, D) tensors: causal attention inside each cu_seqlens segment."""
    assert causal and dropout_p == 0.0 and torch.equal(cu_seqlens_q, cu_seqlens_k)
    bounds = cu_seqlens_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == q.shape[0]
    assert int(max_seqlen_q) == max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    KERNEL_CALLS.append("varlen")
    out = torch.empty_like(q)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        out[a:b] = _causal(q[a:b], k[a:b], v[a:b], softmax_scale)
    return out


def torch_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                          softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn_func on (B, S, H, D) tensors: each row one causal sequence, whatever its position ids."""
    assert causal and dropout_p == 0.0
    KERNEL_CALLS.append("rows")
    return torch.stack([_causal(q[b], k[b], v[b], softmax_scale) for b in range(q.shape[0])])


@pytest.fixture
def torch_flash(monkeypatch):
    """``install(name)``: transformers' flash integration runs the stand-in kernels for implementation ``name``.

    ``lazy_import_flash_attention`` imports flash-attn only when the implementation changes; setting the module's
    loaded implementation and kernel globals (restored after the test) is what that import would have done.
    """
    import transformers.modeling_flash_attention_utils as fa

    def install(name: str) -> None:
        KERNEL_CALLS.clear()
        monkeypatch.setattr(fa, "_loaded_implementation", name)
        monkeypatch.setattr(fa, "_flash_fn", torch_flash_attn_func)
        monkeypatch.setattr(fa, "_flash_varlen_fn", torch_flash_attn_varlen_func)
        monkeypatch.setattr(fa, "_flash_with_kvcache_fn", None)
        monkeypatch.setattr(fa, "_pad_fn", fa._pad_input)
        monkeypatch.setattr(fa, "_unpad_fn", fa._unpad_input)
        monkeypatch.setattr(fa, "_process_flash_kwargs_fn", fa._lazy_define_process_function(torch_flash_attn_varlen_func))
        monkeypatch.setattr(fa, "_process_with_kvcache_kwargs_fn", dict)

    return install


@pytest.fixture
def custom_flash_name():
    """A flash kernel registered under a name of its own through transformers' AttentionInterface."""
    from transformers import AttentionInterface
    from transformers.integrations.flash_attention import flash_attention_forward

    name = "xlt_torch_flash"
    AttentionInterface.register(name, flash_attention_forward)
    yield name
    AttentionInterface._global_mapping.pop(name, None)


# -------------------------------------------------------------------------------------------------------------
# Packed rows as the stream builds them, and the per-document reference
# -------------------------------------------------------------------------------------------------------------
def packed_rows(seed: int = 0) -> tuple[list[dict], list[tuple[int, torch.Tensor]]]:
    """The rows' features (as PretrainStream yields them) and every segment (language, tokens)."""
    rng = np.random.default_rng(seed)
    features, segments = [], []
    for pieces in ROWS:
        rb = RowBuilder(SEQ, SEQ)
        for lang, n in pieces:
            tokens = rng.integers(0, VOCAB, n)
            rb.add(tokens)
            segments.append((lang, torch.from_numpy(tokens).long()))
        ids, pos, labels = rb.finish()
        langs = np.repeat([lang for lang, _ in pieces], [n for _, n in pieces])
        features.append({"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(pos),
                         "labels": torch.from_numpy(labels), LANG_KEY: torch.from_numpy(langs)})
    return features, segments


def per_document(model, segments) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and scored tokens by language, each segment run alone (eager)."""
    model.config._attn_implementation = "eager"
    sums, counts = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for lang, tokens in segments:
            logits = model(input_ids=tokens[None]).logits[0, :-1]
            sums[lang] += torch.nn.functional.cross_entropy(logits, tokens[1:], reduction="sum").double()
            counts[lang] += len(tokens) - 1
    return sums, counts


def cpt_trainer(model, tmp_path):
    from transformers import TrainingArguments

    from xlt.train.cpt import build_cpt_trainer

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=len(ROWS), use_cpu=True,
                             report_to=[], max_steps=1)
    plan = SimpleNamespace(rows_per_step=len(ROWS), tokens_per_step=len(ROWS) * SEQ, max_steps=1)
    return build_cpt_trainer(model, None, args, None, None, plan, None, loss_by_language_steps=1)


def flash_model(name: str):
    model = tiny_llama(VOCAB, layers=2, hidden=64).eval()
    model.config.use_cache = False
    model.config._attn_implementation = name
    return model


# -------------------------------------------------------------------------------------------------------------
# Tests
# -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("registered", [False, True], ids=["flash_attention_2", "registered_flash_kernel"])
def test_flash_packed_loss_equals_the_per_document_loss_at_batch_2(tmp_path, torch_flash, custom_flash_name,
                                                                   registered):
    name = custom_flash_name if registered else "flash_attention_2"
    torch_flash(name)
    model = flash_model(name)
    features, segments = packed_rows()
    sums, counts = per_document(model, segments)
    model.config._attn_implementation = name

    trainer = cpt_trainer(model, tmp_path)
    rows = trainer.data_collator(features)  # what the DataLoader yields: (B, S) rows
    inputs = trainer._prepare_inputs(dict(rows))  # what compute_loss and the forward pass get on each process
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        ran = list(KERNEL_CALLS)
        rows_loss = model(**{k: v for k, v in rows.items() if k != LANG_KEY}).loss  # the (B, S) rows as they are
    expected = sums.sum() / counts.sum()
    torch.testing.assert_close(loss.double(), expected, atol=2e-6, rtol=1e-6)
    assert ran == ["varlen"] * model.config.num_hidden_layers and KERNEL_CALLS[-1] == "rows"
    # The control: the same kernels on the (B, S) rows let documents attend to each other.
    assert abs(rows_loss.double() - expected) > 1e-3

    # The loss by language and its token counts, from the batch the model received.
    trainer.log({"loss": float(loss)})
    logged = trainer.state.log_history[-1]
    for i, lang in enumerate(("ja", "en")):
        assert logged[f"loss_{lang}"] == pytest.approx(float(sums[i] / counts[i]), abs=1.5e-4)
    from xlt.train.losses import logits_language_sums

    with torch.no_grad():
        logits = model(**{k: v for k, v in inputs.items() if k != LANG_KEY}).logits
    s, c = logits_language_sums(logits, inputs["labels"], inputs[LANG_KEY], 2)
    torch.testing.assert_close(c, counts)
    torch.testing.assert_close(s, sums, rtol=1e-5, atol=1e-4)
    # The Trainer counts the scored tokens on the (B, S) rows before they are flattened: the same number.
    assert int((rows["labels"][..., 1:] != -100).sum()) == int((inputs["labels"][..., 1:] != -100).sum()) \
        == int(counts.sum())


def test_flash_layout_is_one_varlen_row_and_other_kernels_keep_the_rows(tmp_path):
    from xlt.data.collate import POSITION_IDS, VARLEN, PackedRowsCollator

    features, segments = packed_rows()
    flash = PackedRowsCollator("flash_attention_2")
    batch = flash.for_model(flash(features))
    assert flash.layout == VARLEN and PackedRowsCollator("flash_attention_3").layout == VARLEN
    assert batch["input_ids"].shape == batch["labels"].shape == batch[LANG_KEY].shape == (1, len(ROWS) * SEQ)
    lengths = [len(t) for _, t in segments]
    assert batch["cu_seq_lens_q"].tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["cu_seq_lens_k"] is batch["cu_seq_lens_q"]
    assert batch["max_length_q"] == batch["max_length_k"] == max(lengths)
    assert torch.equal(batch["input_ids"][0], torch.cat([t for _, t in segments]))
    for name in ("sdpa", "eager", "flex_attention", None):
        other = PackedRowsCollator(name)
        rows = other.for_model(other(features))
        assert other.layout == POSITION_IDS and rows["input_ids"].shape == (len(ROWS), SEQ)
        assert "cu_seq_lens_q" not in rows


def test_sdpa_packed_loss_equals_the_per_document_loss(tmp_path):
    """The position-ids layout stays exact where transformers builds the mask from the restarts."""
    model = flash_model("sdpa")
    features, segments = packed_rows()
    sums, counts = per_document(model, segments)
    model.config._attn_implementation = "sdpa"
    trainer = cpt_trainer(model, tmp_path)
    assert trainer.data_collator.layout == "position_ids"
    inputs = trainer._prepare_inputs(trainer.data_collator(features))
    assert inputs["input_ids"].shape == (len(ROWS), SEQ)
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
    torch.testing.assert_close(loss.double(), sums.sum() / counts.sum(), atol=2e-6, rtol=1e-6)


def test_distillation_alignment_is_the_same_on_the_flattened_row():
    """kd.py finds segments from position ids: the flattened row gives the same teacher tokens and positions."""
    from xlt.data.collate import flatten_packed
    from xlt.train.kd import Aligner

    features, _ = packed_rows()
    rows = {k: torch.stack([f[k] for f in features]) for k in features[0]}
    flat = flatten_packed(rows)
    aligner = Aligner({5: [1, 2, 3], 7: [4, 1]}, VOCAB)
    by_row, one = aligner.align(rows["input_ids"], rows["labels"], rows["position_ids"]), \
        aligner.align(flat["input_ids"], flat["labels"], flat["position_ids"])
    real = by_row.position_ids >= 0
    width = [int(n) for n in aligner.lens[rows["input_ids"]].sum(1)]
    ids = torch.cat([by_row.input_ids[b, :w] for b, w in enumerate(width)])
    pos = torch.cat([by_row.position_ids[b, :w] for b, w in enumerate(width)])
    assert real.any() and torch.equal(one.input_ids[0], ids) and torch.equal(one.position_ids[0], pos)
    assert one.student[0].numel() == by_row.student[0].numel()


def test_flex_attention_gets_a_document_block_mask_from_the_packed_rows(monkeypatch):
    """What ``auto`` picks on a GPU without flash-attn: transformers builds a per-document block mask for
    flex_attention from the rows' position ids (batch 2, no attention mask). The mask is built without
    compiling it (a CPU test; the compiled mask is the same function)."""
    import transformers.masking_utils as mu
    from torch.nn.attention.flex_attention import BlockMask, create_mask

    real = mu.create_block_mask
    monkeypatch.setattr(mu, "create_block_mask", lambda *a, **k: real(*a, **{**k, "_compile": False}))
    model = flash_model("flex_attention")
    features, _ = packed_rows()
    rows = {k: torch.stack([f[k] for f in features]) for k in features[0]}
    mask = mu.create_causal_mask(config=model.config, inputs_embeds=model.model.embed_tokens(rows["input_ids"]),
                                 attention_mask=None, cache=None, position_ids=rows["position_ids"])
    assert isinstance(mask, BlockMask)
    dense = create_mask(mask.mask_mod, len(ROWS), 1, SEQ, SEQ, device="cpu")[:, 0]
    doc = (rows["position_ids"] == 0).cumsum(1)
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    assert torch.equal(dense, (doc[:, :, None] == doc[:, None, :]) & causal)


@pytest.mark.parametrize(("cuda", "have", "expected"), [
    (True, {"flash_attn", "triton"}, "flash_attention_2"),
    (True, {"triton"}, "flex_attention"),
    (True, set(), "sdpa"),
    (False, {"flash_attn", "triton"}, "sdpa"),
])
def test_auto_attention_is_the_fastest_exact_kernel_for_packed_rows(cuda, have, expected):
    from xlt.data.collate import packed_layout
    from xlt.train.runtime import resolve_attn_implementation

    attn = resolve_attn_implementation("auto", cuda=cuda, importable=lambda pkg: pkg in have)
    assert attn == expected
    assert packed_layout(attn) == ("varlen" if expected == "flash_attention_2" else "position_ids")


def test_a_cpt_run_on_the_flash_path_trains_as_the_sdpa_run(tmp_path, tiny_model_dir, torch_flash, monkeypatch):
    """The whole CPT stage (stream, accelerate's dataloader, the Trainer, batch 4) on the flash stand-in follows
    the same losses as on sdpa, both per-document; report.json names the layout each used."""
    import json
    import os

    import xlt.train.cpt as cpt
    from xlt.cli import run_recipe

    def losses(out: str) -> tuple[list[float], dict]:
        with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
            report = json.load(f)
        state = os.path.join(out, f"checkpoint-{report['cpt']['steps']}", "trainer_state.json")
        with open(state, encoding="utf-8") as f:
            return [h["loss"] for h in json.load(f)["log_history"] if "loss" in h], report["cpt"]

    def cpt_args(out: str) -> list[str]:
        return ["--config", str(REPO / "recipes/smollm2-135m-ja/cpt.yaml"), "--model", tiny_model_dir,
                "--output_dir", out, "--tokenizer_mode", "none", "--train_tokens", "3072", "--save_steps", "3",
                "--logging_steps", "1", "--eval_max_docs", "8", "--attn_implementation", "auto"]

    sdpa = str(tmp_path / "sdpa")
    assert run_recipe("cpt", cpt_args(sdpa)) == 0
    torch_flash("flash_attention_2")
    real_runtime, real_load = cpt.check_model_runtime, cpt.load_model

    def flash_runtime(model_args):
        return real_runtime(model_args)[0], "flash_attention_2"

    def load_flash(spec, dtype, attn, trust_remote_code=False):
        model = real_load(spec, dtype, "eager", trust_remote_code)
        model.config._attn_implementation = attn
        return model

    monkeypatch.setattr(cpt, "check_model_runtime", flash_runtime)
    monkeypatch.setattr(cpt, "load_model", load_flash)
    flash = str(tmp_path / "flash")
    assert run_recipe("cpt", cpt_args(flash)) == 0
    (ls, rs), (lf, rf) = losses(sdpa), losses(flash)
    assert len(lf) == len(ls) > 1 and lf == pytest.approx(ls, abs=1e-5), (ls, lf)
    assert KERNEL_CALLS and set(KERNEL_CALLS) == {"varlen"}
    assert (rs["attn_implementation"], rs["packed_layout"]) == ("sdpa", "position_ids")
    assert (rf["attn_implementation"], rf["packed_layout"]) == ("flash_attention_2", "varlen")


def test_sft_packing_is_one_varlen_row_and_per_example_on_the_flash_path(tmp_path, tiny_model_dir,
                                                                          embedded_tokenizer, torch_flash):
    """SFT needs no change: TRL's padding-free collator (packing: true) flattens the per-device batch of packed
    rows into one row with ``cu_seq_lens``, so flash attention keeps examples apart at any batch size."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from xlt.train.sft import IGNORE, build_sft_trainer

    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in (9, 7, 12, 5, 10, 6):
        ids = torch.randint(10, 1000, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * 3 + ids[3:]})
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_length=16, use_cpu=True,
                     report_to="none", bf16=False, packing=True, shuffle_dataset=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    trainer = build_sft_trainer(model, embedded_tokenizer, args, rows, [])
    batch = next(iter(trainer.get_train_dataloader()))
    cu = batch["cu_seq_lens_q"].tolist()
    assert batch["input_ids"].shape[0] == 1 and cu[-1] == batch["input_ids"].shape[1] > args.max_length
    sums, count = torch.zeros((), dtype=torch.float64), 0
    by_ids = {tuple(r["input_ids"]): r for r in rows}
    with torch.no_grad():
        for a, b in zip(cu[:-1], cu[1:], strict=True):
            row = by_ids[tuple(batch["input_ids"][0, a:b].tolist())]  # each segment is one whole example
            labels = torch.tensor(row["labels"])
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            sums += torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=IGNORE, reduction="sum")
            count += int((labels[1:] != IGNORE).sum())
        torch_flash("flash_attention_2")
        model.config._attn_implementation = "flash_attention_2"
        loss = model(**batch).loss
    assert KERNEL_CALLS == ["varlen"] * model.config.num_hidden_layers
    torch.testing.assert_close(loss.double(), sums / count, atol=2e-6, rtol=1e-6)
