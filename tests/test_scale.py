"""The scale path: launchers, precision, activation checkpointing, gathered saves, rotation, locks, resume.

Each test here reproduces a defect that would kill or silently spoil a multi-GPU run (issue 7) on the CPU:
2 gloo processes stand in for GPUs (accelerate_configs/cpu_multi.yaml, torchrun), torch's fully_shard for FSDP2.
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import REPO
from xlt.cli import run_recipe

CPT = str(REPO / "recipes/smollm2-135m-ja/cpt.yaml")
LAUNCH = str(REPO / "tests/scale_launch.py")
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")


def cpt_args(model: str, out: str, *extra: str) -> list[str]:
    return ["--config", CPT, "--model", model, "--output_dir", out, "--tokenizer_mode", "none",
            "--train_tokens", "6144", "--save_steps", "2", "--logging_steps", "1", "--eval_max_docs", "8", *extra]


def sub_env(**extra: str) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", **extra)


def weights(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


# ---------------------------------------------------------------------------------------------------------
# 1. activation checkpointing: one owner
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["fsdp2.yaml", "multi_node_fsdp2.yaml"])
@pytest.mark.parametrize("user_config_sets_fsdp_ac", [False, True])
def test_fsdp_launch_has_one_activation_checkpointing_owner(config, user_config_sets_fsdp_ac, monkeypatch):
    """fsdp2.yaml + a real recipe used to turn on FSDP's and the Trainer's checkpointing: the Trainer raises."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    from xlt.train.runtime import Launcher, own_activation_checkpointing

    launcher = Launcher.from_config_file(str(REPO / "accelerate_configs" / config))
    assert launcher.kind == "fsdp" and launcher.fsdp_version == 2
    # What `accelerate launch` exports from the config (an older config of the user's may still set it).
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING",
                       "true" if (launcher.fsdp_activation_checkpointing or user_config_sets_fsdp_ac) else "false")
    recipe = yaml.safe_load((REPO / "recipes/llama2-7b-ja/cpt.yaml").read_text(encoding="utf-8"))
    assert recipe["activation_checkpointing"] is True
    args = TrainingArguments(output_dir="/tmp/unused", activation_checkpointing=True, use_cpu=True)
    assert own_activation_checkpointing(args, Launcher.from_env()) == "fsdp"
    plugin = FullyShardedDataParallelPlugin()  # reads the environment, as the Trainer's accelerator does
    # transformers' Trainer raises ValueError exactly when both are on.
    assert not (plugin.activation_checkpointing and args.activation_checkpointing)
    assert plugin.activation_checkpointing, "the recipe asked for activation checkpointing: FSDP must do it"


def test_recipe_without_checkpointing_turns_fsdp_checkpointing_off(monkeypatch):
    from transformers import TrainingArguments

    from xlt.train.runtime import Launcher, own_activation_checkpointing

    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    args = TrainingArguments(output_dir="/tmp/unused", activation_checkpointing=False, use_cpu=True)
    env = dict(os.environ)
    assert own_activation_checkpointing(args, Launcher(kind="fsdp", world_size=8, fsdp_version=2), env) == "off"
    assert env["FSDP_ACTIVATION_CHECKPOINTING"] == "false"
    assert own_activation_checkpointing(args, Launcher(kind="ddp", world_size=8), env) == "off"


def test_shipped_fsdp_configs_leave_checkpointing_to_the_recipe():
    for path in glob.glob(str(REPO / "accelerate_configs/*.yaml")):
        cfg = yaml.safe_load(open(path, encoding="utf-8"))
        assert "fsdp_activation_checkpointing" not in (cfg.get("fsdp_config") or {}), path


# ---------------------------------------------------------------------------------------------------------
# 2. TensorBoard logging offline
# ---------------------------------------------------------------------------------------------------------
def test_cpt_logs_to_tensorboard_offline(tmp_path, tiny_model_dir):
    out = str(tmp_path / "run")
    assert run_recipe("cpt", cpt_args(tiny_model_dir, out, "--train_tokens", "2048", "--report_to", "tensorboard")) == 0
    events = glob.glob(os.path.join(out, "runs", "**", "events.out.tfevents.*"), recursive=True)
    assert events, "no TensorBoard event file written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/tokens_trained", "train/ja_share_cum"} <= tags, tags


# ---------------------------------------------------------------------------------------------------------
# 3. gathered save of a sharded model (torch fully_shard = FSDP2, on gloo)
# ---------------------------------------------------------------------------------------------------------
def test_fsdp2_sharded_model_is_saved_through_the_gathering_path(tmp_path, tiny_model_dir):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29541", LAUNCH, "fsdp_save", str(tmp_path), tiny_model_dir],
                          capture_output=True, text=True, env=sub_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["keys_missing"] == []
    assert result["max_abs_diff"] == 0.0
    assert result["replicas_in_sync"] is None  # every parameter is sharded: nothing replicated to compare


def test_fsdp2_sharded_lora_model_is_saved_merged(tmp_path, tiny_model_dir):
    """LoRA with trainable new rows, sharded by fully_shard: the gathered, merged save equals peft's
    merge_and_unload of the same trained adapter on an unsharded copy, key for key."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29545", LAUNCH, "fsdp_lora_save", str(tmp_path), tiny_model_dir],
                          capture_output=True, text=True, env=sub_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "lora.json").read_text())
    assert result["old_rows_equal"] and result["new_rows_changed"] and result["lora_keys"] == []
    assert result["keys_not_in_merge_and_unload"] == result["merge_and_unload_keys_not_saved"] == []
    assert result["max_abs_diff_vs_merge_and_unload"] <= 1e-6, result


def test_replicas_out_of_sync_stop_the_run_on_every_rank(tmp_path, tiny_model_dir):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29542", LAUNCH, "replicas", str(tmp_path), tiny_model_dir],
                          capture_output=True, text=True, env=sub_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"replicas-{rank}.json").read_text())
        assert result["equal"] is True
        assert result["nudged"].startswith("replicas out of sync at step 7"), result


def test_a_run_whose_replicas_diverge_stops_on_every_rank_before_saving(tmp_path, tiny_model_dir):
    """README: a replica mismatch stops the run. A real 2-process run (accelerate launch, cpu_multi.yaml) where
    rank 1 alone drops its optimizer update at step 1 (a rank-local skip decision): the replica check of the
    step-2 checkpoint stops both ranks with the one documented line; nothing is marked complete, no final save."""
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    proc = subprocess.run([ACCELERATE, "launch", "--config_file", str(REPO / "accelerate_configs/cpu_multi.yaml"),
                           "--main_process_port", port, LAUNCH, "cpt_rank_local_skip", "1",
                           *cpt_args(tiny_model_dir, str(out), "--per_device_train_batch_size", "1",
                                     "--train_tokens", "2048")],
                          capture_output=True, text=True, env=sub_env(), cwd=REPO, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("xlt: error:")]
    assert len(errors) == 2 and errors[0] == errors[1], log[-3000:]  # each rank prints its one line, the same
    assert "exitcode  : 2" in log  # the launcher's summary: a rank ended with xlt's error status, not a crash
    assert errors[0].startswith("xlt: error: replicas out of sync at step 2: the processes hold different weights")
    assert not (out / "cpt").exists() and not (out / "checkpoint-2" / "xlt_state.json").exists()
    assert not (out / "checkpoint-4").exists()  # stopped at the first save, not at the end


# ---------------------------------------------------------------------------------------------------------
# 4. precision: one optimizer step changes (nearly) every weight under each shipped recipe's settings
# ---------------------------------------------------------------------------------------------------------
def _fraction_changed(load_dtype: str, lr: float, bf16: bool, tmp_path) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.02)
    model = LlamaForCausalLM(cfg).to(getattr(torch, load_dtype))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r} for r in ids]
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=1, learning_rate=lr, warmup_steps=0,
                             lr_scheduler_type="constant", per_device_train_batch_size=8, bf16=bf16, use_cpu=True,
                             report_to="none", save_strategy="no", disable_tqdm=True, weight_decay=0.0)
    Trainer(model=model, args=args, train_dataset=data).train()
    changed = total = 0
    for n, p in model.named_parameters():
        changed += int((p.detach() != before[n]).sum())
        total += p.numel()
    return changed / total


SHIPPED = sorted(glob.glob(str(REPO / "recipes/*/cpt.yaml")) + glob.glob(str(REPO / "recipes/*/sft.yaml")))


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: "/".join(p.split("/")[-2:]))
def test_one_step_changes_the_weights_under_each_shipped_recipe(recipe, tmp_path):
    """Pure-bf16 AdamW at LR 1e-5 changed ~15% of the weights; fp32 master weights change nearly all. What is the
    recipe's here: the load dtype (xlt's master_weights_dtype decision on its keys), bf16 and the learning rate; the
    step itself is a plain Trainer step of a tiny Llama (the recipes' full path runs in tests/test_recipes_miniature.py,
    in fp32)."""
    from xlt.train.runtime import master_weights_dtype

    keys = yaml.safe_load(open(recipe, encoding="utf-8"))
    torch_dtype = keys.get("torch_dtype", "auto")
    if torch_dtype == "auto":
        torch_dtype = "bfloat16"  # what 'auto' meant on a bf16 GPU: the worst case the recipe must survive
        load = master_weights_dtype(keys.get("master_weights_dtype", "float32"), None)
    else:
        load = master_weights_dtype(keys.get("master_weights_dtype", "float32"), torch_dtype)
    lr = float(keys["learning_rate"])
    frac = _fraction_changed(load, min(lr, 1e-5), bool(keys.get("bf16")), tmp_path)
    assert frac > 0.9, f"{recipe}: one optimizer step changed only {frac:.0%} of the weights (loaded in {load})"


def test_pure_bf16_only_by_name(tmp_path):
    from xlt.config import XltError
    from xlt.train.runtime import master_weights_dtype

    with pytest.raises(XltError, match="torch_dtype=bfloat16 would train pure"):
        master_weights_dtype("float32", "bfloat16")
    assert master_weights_dtype("bfloat16", "bfloat16") == "bfloat16"
    # The control that makes the recipe test meaningful: pure bf16 at 1e-5 loses most updates.
    assert _fraction_changed("bfloat16", 1e-5, True, tmp_path) < 0.5


# ---------------------------------------------------------------------------------------------------------
# 6. attention: checked before any work, auto falls back
# ---------------------------------------------------------------------------------------------------------
def test_attention_is_resolved_before_any_work():
    from xlt.config import XltError
    from xlt.train.runtime import resolve_attn_implementation

    assert resolve_attn_implementation("auto", cuda=False) == "sdpa"
    assert resolve_attn_implementation("auto", cuda=True, importable=lambda p: p == "flash_attn") == "flash_attention_2"
    assert resolve_attn_implementation("auto", cuda=True, importable=lambda p: False) == "sdpa"
    assert resolve_attn_implementation(None) == "sdpa"
    with pytest.raises(XltError, match="needs the flash_attn package"):
        resolve_attn_implementation("flash_attention_2", cuda=True, importable=lambda p: False)
    with pytest.raises(XltError, match="expected one of"):
        resolve_attn_implementation("flash")


def test_flash_attention_without_the_package_fails_before_the_tokenizer_stage(tmp_path, tiny_model_dir, capsys,
                                                                                monkeypatch):
    import transformers

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the attention check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    out = str(tmp_path / "run")
    rc = run_recipe("cpt", cpt_args(tiny_model_dir, out, "--attn_implementation", "flash_attention_2",
                                    "--tokenizer_mode", "extend", "--new_tokens", "64"))
    err = capsys.readouterr().err
    assert rc == 2 and "attn_implementation=flash_attention_2" in err
    assert not os.path.exists(os.path.join(out, "tokenizer"))


# ---------------------------------------------------------------------------------------------------------
# 7. checkpoint rotation never leaves a window without a complete checkpoint
# ---------------------------------------------------------------------------------------------------------
def test_crash_while_marking_a_checkpoint_leaves_the_previous_one(tmp_path, tiny_model_dir, monkeypatch):
    import xlt.train.callbacks as callbacks
    from xlt.train.checkpoint import last_complete_checkpoint

    real = callbacks.atomic_write_json
    calls = []

    def crash_on_second(path, obj):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while marking checkpoint-4 complete")
        return real(path, obj)

    monkeypatch.setattr(callbacks, "atomic_write_json", crash_on_second)
    out = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        run_recipe("cpt", cpt_args(tiny_model_dir, out, "--save_total_limit", "1"))
    assert last_complete_checkpoint(out) == os.path.join(out, "checkpoint-2")
    monkeypatch.setattr(callbacks, "atomic_write_json", real)
    assert run_recipe("cpt", cpt_args(tiny_model_dir, out, "--save_total_limit", "1")) == 0
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-6"]


# ---------------------------------------------------------------------------------------------------------
# 8. model_revision is used
# ---------------------------------------------------------------------------------------------------------
def test_model_revision_pins_the_hub_snapshot(tmp_path, tiny_model_dir, monkeypatch):
    import huggingface_hub

    seen = []

    def fake_snapshot(repo_id, revision=None, **kwargs):
        seen.append((repo_id, revision))
        return tiny_model_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    out = str(tmp_path / "run")
    assert run_recipe("cpt", cpt_args("some-org/some-model", out, "--model_revision", "0123abc",
                                      "--train_tokens", "1024")) == 0
    assert seen and set(seen) == {("some-org/some-model", "0123abc")}  # every hub read of the run: the pinned one


# ---------------------------------------------------------------------------------------------------------
# 9. accelerate launch with cpu_multi.yaml really starts 2 processes; replicas compared at saves
# ---------------------------------------------------------------------------------------------------------
def test_accelerate_launch_cpu_multi_trains_two_replicas_in_sync(tmp_path, tiny_model_dir):
    out = str(tmp_path / "run")
    proc = subprocess.run([ACCELERATE, "launch", "--config_file", str(REPO / "accelerate_configs/cpu_multi.yaml"),
                           "--main_process_port", "29543", str(REPO / "recipes/cpt.py"),
                           *cpt_args(tiny_model_dir, out, "--per_device_train_batch_size", "2",
                                     "--train_tokens", "4096")],
                          capture_output=True, text=True, env=sub_env(), cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes 2 = 1,024" in proc.stdout
    report = json.loads(open(os.path.join(out, "report.json"), encoding="utf-8").read())
    assert report["cpt"]["world_size"] == 2 and report["cpt"]["launcher"] == "ddp"
    assert report["cpt"]["replicas_in_sync"] is True
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(os.path.join(out, "cpt")) is not None


# ---------------------------------------------------------------------------------------------------------
# 10. two launches into one directory
# ---------------------------------------------------------------------------------------------------------
def test_second_launch_into_a_running_directory_stops_at_once(tmp_path, tiny_model_dir, capsys):
    out, marker = str(tmp_path / "run"), str(tmp_path / "marker")
    started = time.time()
    first = subprocess.Popen([sys.executable, LAUNCH, "cpt_pause", marker, "--", *cpt_args(tiny_model_dir, out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=sub_env(), cwd=REPO)
    try:
        deadline = time.time() + 300
        while not os.path.exists(marker):
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.5)
        t0 = time.time()
        rc = run_recipe("cpt", cpt_args(tiny_model_dir, out))
        err = capsys.readouterr().err.strip()
        assert rc == 2 and time.time() - t0 < 60
        assert "in use by another run" in err and f"pid {first.pid}" in err and "\n" not in err
        # The holder is named by host and start time (the lock file's JSON, written when the first run took it).
        assert f"on host {socket.gethostname()}," in err
        since = re.search(r"since (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", err)
        assert since and abs(time.mktime(time.strptime(since.group(1), "%Y-%m-%d %H:%M:%S")) - started) < 300
    finally:
        first.kill()
        first.wait()
    # The holder died without releasing anything: the lock is stale and the same run, relaunched, takes over.
    assert run_recipe("cpt", cpt_args(tiny_model_dir, out)) == 0
    assert os.path.isfile(os.path.join(out, "cpt", "model.safetensors"))


# ---------------------------------------------------------------------------------------------------------
# SIGKILL mid-step, relaunch: the same weights and accounting as an uninterrupted run
# ---------------------------------------------------------------------------------------------------------
def test_sigkill_mid_step_then_relaunch_matches_an_uninterrupted_run(tmp_path, tiny_model_dir):
    """On the in-memory stream (its state restored from the checkpoint); on the shards: test_data_shards."""
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    stream = ("--data_source", "stream")
    assert run_recipe("cpt", cpt_args(tiny_model_dir, full, *stream)) == 0
    # Killed during step 4 (global_step 3 done; after its backward, before its optimizer step): the last
    # complete checkpoint is checkpoint-2, so the relaunch redoes steps 3-6.
    proc = subprocess.run([sys.executable, LAUNCH, "cpt_sigkill", "3", "--", *cpt_args(tiny_model_dir, killed, *stream)],
                          capture_output=True, text=True, env=sub_env(), cwd=REPO, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not os.path.exists(os.path.join(killed, "cpt"))
    assert run_recipe("cpt", cpt_args(tiny_model_dir, killed, *stream)) == 0
    a, b = weights(os.path.join(full, "cpt")), weights(os.path.join(killed, "cpt"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)  # stated tolerance: fp32 reduction order
    ra = json.loads(open(os.path.join(full, "report.json"), encoding="utf-8").read())
    rb = json.loads(open(os.path.join(killed, "report.json"), encoding="utf-8").read())
    assert ra["tokens_trained"] == rb["tokens_trained"]
    assert ra["cpt"]["accounting"] == rb["cpt"]["accounting"]


# ---------------------------------------------------------------------------------------------------------
# LoRA continued pretraining under accelerate launch (2 processes): new rows train, merged save reloads
# ---------------------------------------------------------------------------------------------------------
def test_lora_cpt_with_new_rows_under_two_processes(tmp_path, tiny_model_dir):
    out = str(tmp_path / "run")
    proc = subprocess.run([ACCELERATE, "launch", "--config_file", str(REPO / "accelerate_configs/cpu_multi.yaml"),
                           "--main_process_port", "29544", str(REPO / "recipes/cpt.py"),
                           *cpt_args(tiny_model_dir, out, "--tokenizer_mode", "extend", "--new_tokens", "64",
                                     "--per_device_train_batch_size", "2", "--train_tokens", "4096",
                                     "--use_lora", "true", "--lora_r", "8", "--lora_alpha", "16",
                                     "--learning_rate", "1e-2")],
                          capture_output=True, text=True, env=sub_env(), cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(open(os.path.join(out, "report.json"), encoding="utf-8").read())
    assert report["cpt"]["mode"] == "lora" and report["cpt"]["world_size"] == 2
    assert report["cpt"]["replicas_in_sync"] is True
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_rows = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    before, after = weights(os.path.join(out, "tokenizer")), weights(os.path.join(out, "cpt"))
    assert set(after) == set(before), "the merged model has the base model's keys (no adapter leftovers)"
    emb = "model.embed_tokens.weight"
    assert torch.equal(before[emb][:base_rows], after[emb][:base_rows]), "old rows must not move under LoRA"
    assert not torch.equal(before[emb][base_rows:], after[emb][base_rows:]), "the new rows must train"
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[key], after[key]), "the LoRA delta is merged into the base weight"
    assert AutoModelForCausalLM.from_pretrained(os.path.join(out, "cpt")) is not None


# ---------------------------------------------------------------------------------------------------------
# loss by language: measured on logging steps from the forward pass's own logits
# ---------------------------------------------------------------------------------------------------------
def test_loss_by_language_equals_a_direct_computation():
    from xlt.train.losses import logits_language_sums

    torch.manual_seed(0)
    logits = torch.randn(2, 600, 50)
    labels = torch.randint(0, 50, (2, 600))
    labels[:, 0] = labels[0, 300] = -100
    langs = torch.zeros(2, 600, dtype=torch.long)
    langs[0, 200:] = 1
    sums, counts = logits_language_sums(logits, labels, langs, 2)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1),
                                           ignore_index=-100, reduction="none").reshape(2, 599).double()
    tgt_lang, valid = langs[:, 1:], labels[:, 1:] != -100
    for i in (0, 1):
        m = valid & (tgt_lang == i)
        assert counts[i] == m.sum()
        torch.testing.assert_close(sums[i], ce[m].sum())
    assert counts.sum() == valid.sum()


def test_cpt_logs_the_loss_of_each_language(tmp_path, tiny_model_dir):
    out = str(tmp_path / "run")
    assert run_recipe("cpt", cpt_args(tiny_model_dir, out, "--train_tokens", "4096", "--logging_steps", "2",
                                      "--loss_by_language_steps", "2")) == 0
    state = json.loads(open(os.path.join(out, "checkpoint-4", "trainer_state.json"), encoding="utf-8").read())
    logs = [h for h in state["log_history"] if "loss" in h]
    assert logs and all(h["loss_ja"] > 0 and h["loss_en"] > 0 for h in logs)
    # The two languages are measured apart: a random model finds them unequally hard.
    assert all(h["loss_ja"] != h["loss_en"] for h in logs)


def test_crash_after_the_last_checkpoint_resumes_without_an_extra_step(tmp_path, tiny_model_dir, monkeypatch):
    """Killed between the final checkpoint and the final save: the relaunch saves, it does not train step N+1."""
    import xlt.train.cpt as cpt_module

    full, crashed = str(tmp_path / "full"), str(tmp_path / "crashed")
    args = ("--lr_scheduler_type", "constant")  # a non-zero LR at the end: an extra step would move the weights
    assert run_recipe("cpt", cpt_args(tiny_model_dir, full, *args)) == 0
    real = cpt_module.save_final_model

    def crash(*a, **k):
        raise KeyboardInterrupt("killed before the final save")

    monkeypatch.setattr(cpt_module, "save_final_model", crash)
    with pytest.raises(KeyboardInterrupt):
        run_recipe("cpt", cpt_args(tiny_model_dir, crashed, *args))
    monkeypatch.setattr(cpt_module, "save_final_model", real)
    assert os.path.isdir(os.path.join(crashed, "checkpoint-6")) and not os.path.exists(os.path.join(crashed, "cpt"))
    assert run_recipe("cpt", cpt_args(tiny_model_dir, crashed, *args)) == 0
    assert not os.path.exists(os.path.join(crashed, "checkpoint-7"))
    report = json.loads(open(os.path.join(crashed, "report.json"), encoding="utf-8").read())
    assert report["cpt"]["steps"] == 6
    a, b = weights(os.path.join(full, "cpt")), weights(os.path.join(crashed, "cpt"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
