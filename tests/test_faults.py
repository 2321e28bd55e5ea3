"""Bad settings, bad files and faults (a full disk, Ctrl-C, a second run, a kill) against train.py,
generate.py, export.py and lora_core.load: one-line errors, non-zero exits, and nothing lost."""
import errno
import fcntl
import json
import math
from pathlib import Path

import pytest
import torch

import lora_core
from lora_core.cli import export as export_cli
from lora_core.cli import generate as generate_cli
from lora_core.cli import train as train_cli

from helpers import DATA, need_shared, randomize_lora, run_cli

LUOTUO = DATA / "luotuo_developer_instruction.json"


def train_args(base, out, *extra, data=None):
    return ["--data", data or need_shared(LUOTUO), "--base", base, "--output", out, "--base-dtype", "fp32",
            "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "2", "--warmup-steps", "1",
            "--val-size", "0", "--cutoff-len", "64", "--save-every", "1", *extra]


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("flags,message", [
    (["--micro-batch-size", "0"], "--micro-batch-size 0: must be at least 1"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--save-every", "0"], "--save-every 0: must be at least 1"),
    (["--eval-every", "0", "--val-size", "2"], "--eval-every 0: must be at least 1"),
    (["--max-grad-norm", "-1"], "--max-grad-norm -1.0: must be 0 or more"),
    (["--lr", "0"], "--lr 0.0: must be a positive number"),
    (["--lr", "nan"], "--lr nan: must be a positive number"),
    (["--epochs", "0", "--max-steps", "0"], "--epochs 0.0: must be a positive number"),
    (["--epochs", "-2"], "--epochs -2.0: must be a positive number"),
    (["--max-steps", "0"], "--max-steps 0: must be at least 1"),
    (["--max-steps", "-1"], "--max-steps -1: must be at least 1"),
    (["--lora-dropout", "1"], "--lora-dropout 1.0: must be in [0, 1)"),
    (["--base-dtype", "int3"], "base dtype 'int3' is not one of int8, int4, bf16, fp32"),
    (["--base-dtype", "int4"], "base dtype 'int4' is for generation only"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--resume", "/nonexistent/run"], "--resume /nonexistent/run: no such directory"),
    (["--int8-path", "fast"], "int8 path 'fast' is unknown"),
])
def test_train_settings_that_cannot_be_meant(tiny_base, tmp_path, capsys, flags, message):
    code, _, err = run_cli(train_cli.main, train_args(tiny_base, tmp_path / "o", *flags), capsys)
    assert code == 1 and message in last_line(err) and last_line(err).startswith("train.py: error: ")
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("content,name,message", [
    ("[" * 100000 + "]" * 100000, "deep.json", "nested too deeply"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff\xfe", "output": "c"}\n', "bad.jsonl",
     "bad.jsonl:2: not UTF-8 (byte 0xff"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 3, "dpo.jsonl", "preference data (chosen/rejected"),
    ('{"text": 5}\n' * 3, "raw.jsonl", "no usable examples"),  # raw text is data now: bad raw records
    ("  \n", "notes.txt", "an empty text file"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "chat.jsonl", "chat messages in OpenAI/ShareGPT form"),
])
def test_train_data_errors_name_the_file_and_come_before_the_model(tiny_base, tmp_path, capsys, monkeypatch,
                                                                  content, name, message):
    import lora_core.trainer as trainer

    monkeypatch.setattr(trainer, "load_from", lambda *a, **k: pytest.fail("the model was loaded before the data"))
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, err = run_cli(train_cli.main, train_args(tiny_base, tmp_path / "o", data=path), capsys)
    assert code == 1 and message in last_line(err) and str(path) in last_line(err)


def test_a_directory_as_data(tiny_base, tmp_path, capsys):
    code, _, err = run_cli(train_cli.main, train_args(tiny_base, tmp_path / "o", data=tmp_path), capsys)
    assert code == 1 and "a directory, not a data file" in last_line(err)


def test_placeholders_are_warned_about_once_with_a_count(tiny_base, tmp_path, capsys):
    rows = [{"instruction": f"Who are you? {i}", "output": "I am {{name}}, made by {{author}}."} for i in range(5)]
    rows += [{"instruction": "Say hi.", "output": "Hi."}] * 5
    (tmp_path / "d.json").write_text(json.dumps(rows))
    code, _, err = run_cli(train_cli.main, train_args(tiny_base, tmp_path / "o", data=tmp_path / "d.json"), capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "placeholders" in line]
    assert len(warnings) == 1 and "5 records hold {{name}}-style placeholders" in warnings[0]


def test_finished_run_is_protected_and_replaced_only_with_force(tiny_base, tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(train_cli.main, train_args(tiny_base, out, "--save-every", "5"), capsys)[0] == 0
    adapter = (out / "adapter_model.safetensors").read_bytes()
    import shutil

    shutil.rmtree(out / "checkpoints")  # as if cleaned up by the user: only the finished adapter is left
    code, _, err = run_cli(train_cli.main, train_args(tiny_base, out, "--seed", "7"), capsys)
    assert code == 1 and "holds the finished adapter of an earlier run; add --force" in last_line(err)
    assert (out / "adapter_model.safetensors").read_bytes() == adapter
    code, _, err = run_cli(train_cli.main, train_args(tiny_base, out, "--seed", "7", "--force"), capsys)
    assert code == 0, err
    assert (out / "adapter_model.safetensors").read_bytes() != adapter
    assert json.loads((out / "training_args.json").read_text())["seed"] == 7


def test_a_second_run_into_the_same_output_is_refused(tiny_base, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # a run in progress holds this lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = run_cli(train_cli.main, train_args(tiny_base, out), capsys)
    assert code == 1 and "another training run is writing here" in last_line(err)
    assert not (out / "metrics.jsonl").exists()


def test_resume_refuses_another_run_and_records_what_changed(tiny_base, tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(train_cli.main, train_args(tiny_base, out), capsys)[0] == 0
    code, _, err = run_cli(train_cli.main, train_args(tiny_base, out, "--resume", "--lora-r", "16"), capsys)
    assert code == 1 and "--lora-r was 8 in the checkpointed run and is 16 now" in last_line(err)
    code, _, err = run_cli(train_cli.main, train_args(tiny_base, out, "--resume", "--max-steps", "3", "--lr", "1e-4"),
                           capsys)
    assert code == 0, err
    assert "--resume: --lr changed from 0.0003 to 0.0001" in err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 2, "resumed": True, "changed": {"max_steps": 3, "lr": 0.0001}} in rows
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]


def test_torn_last_metrics_line_does_not_block_resume(tiny_base, tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(train_cli.main, train_args(tiny_base, out), capsys)[0] == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # killed in the middle of the write
    code, _, err = run_cli(train_cli.main, train_args(tiny_base, out, "--resume", "--max-steps", "3"), capsys)
    assert code == 0, err


def test_ctrl_c_keeps_the_checkpoints_and_says_how_to_resume(tiny_base, tmp_path, capsys, monkeypatch):
    import lora_core.trainer as trainer

    real = trainer.accumulate_gradients
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trainer, "accumulate_gradients", interrupted)
    code, _, err = run_cli(train_cli.main, train_args(tiny_base, tmp_path / "o"), capsys)
    assert code == 130 and "interrupted" in last_line(err) and "add --resume" in last_line(err)
    assert "(step-0000001)" in last_line(err)
    assert (tmp_path / "o" / "checkpoints" / "step-0000001").is_dir()
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


def test_ctrl_c_before_any_checkpoint_says_so(tiny_base, tmp_path, capsys, monkeypatch):
    import lora_core.trainer as trainer

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "accumulate_gradients", interrupted)
    code, _, err = run_cli(train_cli.main, train_args(tiny_base, tmp_path / "o"), capsys)
    assert code == 130 and "no checkpoint was written yet" in last_line(err) and "--resume" not in last_line(err)


@pytest.mark.parametrize("where", ["checkpoint", "final adapter"])
def test_full_disk_leaves_no_partial_files(tiny_base, tmp_path, capsys, monkeypatch, where):
    import safetensors.torch

    import lora_core.adapter as adapter_module
    import lora_core.train_state as train_state

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "checkpoint":
        monkeypatch.setattr(train_state.torch, "save", no_space)
    else:
        real = safetensors.torch.save_file

        def full_at_the_end(tensors, path, metadata=None):
            if ".tmp-step-" not in path:
                no_space()
            real(tensors, path, metadata=metadata)

        monkeypatch.setattr(adapter_module, "save_file", full_at_the_end)
    out = tmp_path / "o"
    code, _, err = run_cli(train_cli.main, train_args(tiny_base, out), capsys)
    assert code == 1 and "the disk filled up while writing the " in last_line(err) and "[Errno" not in last_line(err)
    # the first checkpoint failed: nothing to resume from; the final save failed: its step's checkpoint is there
    assert ("the same command starts over" if where == "checkpoint" else "--resume") in last_line(err)
    leftovers = [p.name for p in out.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
    assert not (out / "adapter_model.safetensors").exists() and not (out / "training_args.json").exists()


def test_a_non_finite_step_writes_no_checkpoint(tiny_base, tmp_path, capsys, monkeypatch):
    import lora_core.trainer as trainer

    real, steps = trainer.accumulate_gradients, []

    def poisoned(model, *a, **k):  # the second step's gradients turn NaN
        loss, tokens = real(model, *a, **k)
        steps.append(1)
        if len(steps) == 2:
            next(p for p in model.parameters() if p.requires_grad).grad.fill_(float("nan"))
        return loss, tokens

    monkeypatch.setattr(trainer, "accumulate_gradients", poisoned)
    code, _, err = run_cli(train_cli.main, train_args(tiny_base, tmp_path / "o"), capsys)
    assert code == 1 and "step 2: the loss is" in last_line(err) and "gradient norm nan" in last_line(err)
    assert sorted(p.name for p in (tmp_path / "o" / "checkpoints").iterdir()) == ["step-0000001"]


@pytest.fixture
def saved_adapter(tiny_base, tmp_path):
    from lora_core.adapter import save_adapter
    from lora_core.lora import apply_lora

    model, _ = lora_core.load(tiny_base)
    apply_lora(model, "q_proj,v_proj", r=4, alpha=8)
    randomize_lora(model)
    return save_adapter(model, tmp_path / "adapter", str(tiny_base))


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(lora_alpha="16"), "lora_alpha is '16'; it must be a positive number"),
    (lambda c: c.update(r=8), "adapter_config.json says r=8; the config does not belong to these weights"),
    (lambda c: c.update(target_modules=["q_proj"]), "target_modules lists ['q_proj'] but the tensors also hold "
                                                    "['v_proj']"),
    (lambda c: c.update(r=None), "r is None; it must be a positive number (an integer)"),
])
def test_adapter_config_that_does_not_fit_its_tensors(tiny_base, saved_adapter, edit, message):
    path = saved_adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError) as e:
        lora_core.load(tiny_base, adapter=saved_adapter)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_adapter_with_nan_is_refused(tiny_base, saved_adapter):
    from safetensors.torch import load_file, save_file

    f = saved_adapter / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = math.inf
    save_file(tensors, str(f), metadata={"lora_core": "{}"})
    with pytest.raises(ValueError, match="holds NaN or inf values"):
        lora_core.load(tiny_base, adapter=saved_adapter)


def test_api_errors_are_the_cli_lines(tiny_base, tmp_path):
    with pytest.raises(ValueError, match=r"^base dtype 'int3' is not one of int8, int4, bf16, fp32"):
        lora_core.load(tiny_base, dtype="int3")
    with pytest.raises(FileNotFoundError, match="no such adapter directory"):
        lora_core.load(tiny_base, adapter=tmp_path / "missing")


@pytest.mark.parametrize("config,message", [
    (lambda c: c.pop("hidden_size"), "config.json: hidden_size is missing"),
    (lambda c: c.update(num_attention_heads="4"), "config.json: num_attention_heads is '4'; expected a positive "
                                                  "integer"),
    (lambda c: c.update(rms_norm_eps="1e-5"), "rms_norm_eps is '1e-5'; expected a positive number"),
])
def test_hf_config_errors(tiny_base, tmp_path, config, message):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    cfg = json.loads((base / "config.json").read_text())
    config(cfg)
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        lora_core.load(base)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_generate_refuses_an_impossible_temperature(tiny_base, capsys, value):
    code, _, err = run_cli(generate_cli.main, ["--base", tiny_base, "--prompt", "hi", "--temperature", value], capsys)
    assert code == 1 and "--temperature" in last_line(err) and "must be a finite number >= 0" in last_line(err)


def test_generate_output_file_cases(tiny_base, tmp_path, capsys, monkeypatch):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"instruction": f"Say {i}."}) + "\n" for i in range(4)))
    base = ["--base", tiny_base, "--base-dtype", "fp32", "--max-new-tokens", "3", "--temperature", "0",
            "--input-file", questions]
    # the output is the input
    code, _, err = run_cli(generate_cli.main, base + ["--output-file", tmp_path / "." / "q.jsonl"], capsys)
    assert code == 1 and "the output file is the input file" in last_line(err)
    assert len(questions.read_text().splitlines()) == 4
    # a missing directory is made
    out = tmp_path / "new" / "dir" / "a.jsonl"
    code, _, err = run_cli(generate_cli.main, base + ["--output-file", out], capsys)
    assert code == 0, err
    first = out.read_text()
    assert len(first.splitlines()) == 4
    # an existing output needs --force
    code, _, err = run_cli(generate_cli.main, base + ["--output-file", out], capsys)
    assert code == 1 and "already exists; pass --force" in last_line(err) and out.read_text() == first
    # interrupted after the first batch of two answers: they are kept, and --resume answers only the rest (in
    # batches of 2 here, of 8 above: the same greedy answers)
    import lora_core.cli.generate as cli

    real, answered = cli.generate_batch, []

    def interrupted(*a, **k):
        if answered:
            raise KeyboardInterrupt
        answered.append(1)
        return real(*a, **k)

    monkeypatch.setattr(cli, "generate_batch", interrupted)
    out2 = tmp_path / "b.jsonl"
    code, _, err = run_cli(generate_cli.main, base + ["--output-file", out2, "--batch-size", "2"], capsys)
    assert code == 130 and "rerun with --resume" in last_line(err) and not out2.exists()
    partial = tmp_path / ".b.jsonl.partial"
    assert len(partial.read_text().splitlines()) == 2
    monkeypatch.setattr(cli, "generate_batch", real)
    code, _, err = run_cli(generate_cli.main, base + ["--output-file", out2, "--resume", "--batch-size", "3"], capsys)
    assert code == 0 and "2 of 4 records already answered" in err
    assert out2.read_text() == first and not partial.exists()


def test_answers_on_a_full_disk_keep_what_was_written(tmp_path):
    from lora_core.answers import AnswerFile

    source = tmp_path / "q.json"
    source.write_text("[]")
    out = AnswerFile(tmp_path / "a.jsonl", source)
    out.add({"instruction": "one", "response": "1"})

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    kept, out._file = out._file, Full()
    kept.close()
    with pytest.raises(OSError, match=r"a.jsonl.partial: the disk filled up .* rerun with --resume"):
        out.add({"instruction": "two", "response": "2"})
    assert AnswerFile(tmp_path / "a.jsonl", source, resume=True).done == [{"instruction": "one", "response": "1"}]


def test_export_never_overwrites_what_it_reads(tiny_base, saved_adapter, tmp_path, capsys):
    before = sorted(p.name for p in saved_adapter.iterdir())
    code, _, err = run_cli(export_cli.main, ["--base", tiny_base, "--adapter", saved_adapter, "--format", "hf",
                                             "--out", saved_adapter, "--force"], capsys)
    assert code == 1 and "which the export reads" in last_line(err)
    assert sorted(p.name for p in saved_adapter.iterdir()) == before
    code, _, err = run_cli(export_cli.main, ["--base", tiny_base, "--adapter", saved_adapter, "--format", "hf",
                                             "--out", tmp_path, "--force"], capsys)
    assert code == 1 and "which the export reads" in last_line(err)


def test_export_into_a_read_only_directory(tiny_base, tmp_path, capsys, monkeypatch):
    """Read-only for this user (or a read-only mount, which root meets too): os.access says so."""
    import os

    import lora_core.export.exporter as exporter

    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    real = os.access
    monkeypatch.setattr(exporter.os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    code, _, err = run_cli(export_cli.main, ["--base", tiny_base, "--format", "hf", "--out", ro / "hf"], capsys)
    assert code == 1 and "not writable" in last_line(err)


def test_export_removes_temporaries_of_killed_exports(tiny_base, tmp_path, capsys):
    stale = tmp_path / ".m.tmp-999999.gguf"  # no such process
    stale.write_bytes(b"half an export")
    code, _, err = run_cli(export_cli.main, ["--base", tiny_base, "--format", "gguf", "--out", tmp_path / "m.gguf",
                                             "--dtype", "f32"], capsys)
    assert code == 0, err
    assert not stale.exists() and f"removed {stale}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_export_ctrl_c(tiny_base, tmp_path, capsys, monkeypatch):
    import lora_core.export.exporter as exporter

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "write_gguf", interrupted)
    code, _, err = run_cli(export_cli.main, ["--base", tiny_base, "--format", "gguf", "--out", tmp_path / "m.gguf"],
                           capsys)
    assert code == 130 and "interrupted; nothing was written" in last_line(err)
    assert list(tmp_path.iterdir()) == []


def test_gradients_are_finite_in_a_normal_run(tiny_base, tmp_path, capsys):
    """The guard above must not fire on a healthy run (a test that cannot fail would prove nothing)."""
    code, _, err = run_cli(train_cli.main, train_args(tiny_base, tmp_path / "o"), capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)
    assert torch.load(tmp_path / "o" / "checkpoints" / "step-0000002" / "trainer_state.pt", weights_only=False)[
        "config"]["lora_r"] == 8
