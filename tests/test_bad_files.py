"""Each damaged or foreign file gets one clear error naming the file and the fault."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from chatglm import load_model
from chatglm.errors import ModelFileError

from checkpoints import thudm_config, thudm_state_dict, tiny_glm, tiny_llama, write_folder


@pytest.fixture(scope="module")
def glm():
    return tiny_glm(layers=1)


def test_missing_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFileError, match="config.json is missing"):
        load_model(tmp_path)


def test_unknown_architecture(tmp_path, glm):
    write_folder(tmp_path, {"model_type": "gpt_bigcode"}, thudm_state_dict(glm))
    with pytest.raises(ModelFileError, match="unknown architecture 'gpt_bigcode'"):
        load_model(tmp_path)


def test_missing_tensor(tmp_path, glm):
    state = thudm_state_dict(glm)
    del state["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"]
    write_folder(tmp_path, thudm_config(glm), state)
    with pytest.raises(ModelFileError, match=r"dense_4h_to_h.weight' is missing \(expected shape \[64, 96\]\)"):
        load_model(tmp_path)


def test_wrong_shape(tmp_path, glm):
    state = thudm_state_dict(glm)
    state["transformer.encoder.layers.0.self_attention.dense.weight"] = torch.zeros(64, 60)
    write_folder(tmp_path, thudm_config(glm), state)
    with pytest.raises(ModelFileError, match=r"dense.weight' has shape \[64, 60\], expected \[64, 64\]"):
        load_model(tmp_path)


def test_missing_config_field(tmp_path, glm):
    cfg = thudm_config(glm)
    del cfg["ffn_hidden_size"]
    write_folder(tmp_path, cfg, thudm_state_dict(glm))
    with pytest.raises(ModelFileError, match="config field ffn_hidden_size is missing"):
        load_model(tmp_path)


def test_bad_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="config.json: not valid JSON"):
        load_model(tmp_path)


def test_truncated_safetensors(tmp_path, glm):
    write_folder(tmp_path, thudm_config(glm), thudm_state_dict(glm))
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="model.safetensors"):
        load_model(tmp_path)


def test_truncated_bin(tmp_path, glm):
    write_folder(tmp_path, thudm_config(glm), thudm_state_dict(glm), fmt="bin")
    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.raises(ModelFileError, match="pytorch_model.bin"):
        load_model(tmp_path)


def test_not_a_model_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(ModelFileError, match="not a model file"):
        load_model(f)


def test_missing_path(tmp_path):
    with pytest.raises(ModelFileError, match="no such file or folder"):
        load_model(tmp_path / "nothing.gguf")


def test_truncated_gguf(tmp_path):
    from test_models import write_llama_gguf

    path = write_llama_gguf(tmp_path / "t.gguf", tiny_llama(layers=1))
    data = path.read_bytes()
    for cut in (10, 200, len(data) - 64):
        path.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="t.gguf"):
            load_model(path)


def test_unknown_gguf_arch(tmp_path):
    import gguf

    path = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match="unknown GGUF architecture 'mamba'"):
        load_model(path)


def test_cli_prints_one_line_not_a_traceback(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nope"}))
    proc = subprocess.run([sys.executable, "-m", "chatglm.cli", "chat", "-m", str(tmp_path), "-p", "hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "unknown architecture 'nope'" in lines[0]
