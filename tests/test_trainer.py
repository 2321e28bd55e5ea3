"""The training loop: accumulation equals one big batch, schedule, exact resume after SIGKILL,
data parallel equals one process, outputs on disk."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lora_core.data import ALPACA, load_examples
from lora_core.lora import LoRALinear, apply_lora, mark_only_lora_trainable
from lora_core.train_config import TrainConfig
from lora_core.trainer import accumulate_gradients, lr_at

from helpers import DATA, ROOT, free_port, need_shared

PARAMS = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5)


def test_accumulated_micro_batches_equal_one_batch(tiny_base):
    import lora_core

    def grads(micro, micro_tokens=None):
        torch.manual_seed(0)
        model, tok = lora_core.load(tiny_base)
        apply_lora(model, "all", r=4, alpha=8)
        mark_only_lora_trainable(model)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                torch.nn.init.normal_(m.lora_B, std=0.1)
        examples, _ = load_examples(need_shared(DATA / "luotuo_developer_instruction.json"), tok, ALPACA, 128)
        batch = examples[:8]
        loss, _ = accumulate_gradients(model, batch, sum(e.n_targets for e in batch), micro, tok.pad_id, micro_tokens)
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss1, g1 = grads(8)
    # 3 does not divide 8 (a short last micro-batch); token budgets of 150 and 400 padded tokens group by length
    for micro, budget in ((1, None), (3, None), (8, 150), (8, 400)):
        loss_k, gk = grads(micro, budget)
        assert loss_k == pytest.approx(loss1, rel=1e-5)
        for name in g1:
            torch.testing.assert_close(gk[name], g1[name], rtol=1e-4, atol=1e-7)


def test_token_budget_micro_batches():
    from lora_core.batching import micro_batches
    from lora_core.data import Example

    examples = [Example([1] * n, [1] * n) for n in (5, 40, 7, 12, 90, 33, 12, 8)]
    groups = micro_batches(examples, size=8, max_tokens=64)
    assert sorted(len(e.input_ids) for g in groups for e in g) == sorted(len(e.input_ids) for e in examples)
    for g in groups:
        padded = len(g) * max(len(e.input_ids) for e in g)
        assert padded <= 64 or len(g) == 1  # only an example longer than the budget goes over it, alone
    assert [len(e.input_ids) for e in groups[-1]] == [90]
    assert [len(g) for g in micro_batches(examples, size=3)] == [3, 3, 2]


def test_lr_schedule():
    cfg = TrainConfig(data=[], lr=1.0, warmup_steps=4)
    lrs = [lr_at(s, cfg, 12) for s in range(12)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0 and lrs[-1] < 0.05
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # cosine never rises
    cfg.schedule = "linear"
    assert lr_at(8, cfg, 12) == pytest.approx(0.5)


def run_train(args, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def losses(out):
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def common(tiny_base, out):
    return ["--data", str(DATA / "luotuo_developer_instruction.json"), "--base", str(tiny_base), "--output", str(out),
            "--base-dtype", "fp32", "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "6",
            "--warmup-steps", "2", "--lora-dropout", "0.1", "--val-size", "4", "--eval-every", "3",
            "--save-every", "2", "--cutoff-len", "96", "--targets", "all"]


def test_resume_after_sigkill_equals_uninterrupted(tiny_base, tmp_path):
    full = run_train(common(tiny_base, tmp_path / "full"))
    assert full.wait(timeout=600) == 0, full.stdout.read()
    expected = losses(tmp_path / "full")
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]

    out = tmp_path / "killed"
    victim = run_train(common(tiny_base, out))
    deadline = time.time() + 600
    while not (out / "checkpoints" / "step-0000004").is_dir() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    resumed = run_train(common(tiny_base, out) + ["--resume"])
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log
    assert "resumed from" in log and "step-0000004" in log
    got = losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (step, got, expected)
    for name in ("adapter_config.json", "adapter_model.safetensors", "training_args.json", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8


def test_fresh_run_refuses_to_mix_with_old_checkpoints(tiny_base, tmp_path):
    first = run_train(common(tiny_base, tmp_path / "o"))
    assert first.wait(timeout=600) == 0
    again = run_train(common(tiny_base, tmp_path / "o"))
    log = again.communicate(timeout=600)[0]
    assert again.returncode == 1 and "holds checkpoints of an earlier run; add --resume" in log


def test_two_processes_equal_one(tiny_base, tmp_path):
    one = run_train(common(tiny_base, tmp_path / "one") + ["--lora-dropout", "0"])
    assert one.wait(timeout=600) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), str(ROOT / "train.py"), *common(tiny_base, tmp_path / "two"),
                "--lora-dropout", "0"]
    two = subprocess.run(torchrun, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a, b)


@pytest.mark.slow
def test_twenty_kills_at_random_moments_then_resume_equal_an_uninterrupted_run(tiny_base, tmp_path):
    """SIGKILL a --save-every 1 run at random moments (during steps, evaluation and checkpoint writes) at
    least 20 times, resuming after each; every kill leaves a readable last checkpoint, and the final adapter
    equals an uninterrupted run's."""
    import random
    import shutil

    from safetensors.torch import load_file

    import lora_core
    from lora_core.adapter import read_adapter
    from lora_core.train_state import latest_checkpoint, read_state

    steps = 40
    args = common(tiny_base, tmp_path / "full") + ["--max-steps", str(steps), "--save-every", "1"]
    full = run_train(args)
    assert full.wait(timeout=900) == 0, full.stdout.read()
    out, rng, kills = tmp_path / "killed", random.Random(1234), 0
    model_args = lora_core.open_base(tiny_base)[0].args
    while True:
        resume = ["--resume"] if latest_checkpoint(out / "checkpoints") else []
        proc = run_train(common(tiny_base, out) + ["--max-steps", str(steps), "--save-every", "1"] + resume)
        start = len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").exists() else 0
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:  # wait for a step of progress, then a random moment
            if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) > start:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.6))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
        else:
            assert proc.returncode == 0, proc.stdout.read()[-3000:]
        if (out / "training_args.json").exists():  # the run finished (perhaps killed just after its last write)
            if kills >= 20:
                break
            shutil.rmtree(out)  # finished before 20 kills: start the whole run again
            continue
        last = latest_checkpoint(out / "checkpoints")
        if last is not None:  # whatever the moment of the kill, the newest complete checkpoint reads back
            read_state(last)
            read_adapter(last, model_args)
    want = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    diff = max((want[k] - got[k]).abs().max().item() for k in want)
    print(f"\n{kills} kills; final adapter max |difference| from the uninterrupted run: {diff:.3g}")
    assert want.keys() == got.keys() and diff == 0.0
