"""chatglm.cpp's GGML files: our writer's files read back to the same model, damaged files refused."""
from __future__ import annotations

import io

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from chatglm import load_model
from chatglm.errors import ModelFileError
from chatglm.loaders.ggml import write_ggml

from checkpoints import thudm_state_dict, tiny_glm
from test_models import IDS, reference_logits, rel_err


def ggml_bytes(glm, qtype: Q, tokenizer: bytes = b"") -> bytes:
    c = glm.config
    record = dict(dtype=qtype.value, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                  num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads, num_layers=c.num_hidden_layers,
                  ffn_size=c.intermediate_size, norm_eps=c.rms_norm_eps, num_virtual_tokens=0, rope_theta=10000.0,
                  max_length=128, eos_token_id=2, pad_token_id=0)
    tensors = []
    for name, t in thudm_state_dict(glm).items():
        arr = t.float().numpy()
        if arr.ndim == 2 and qtype not in (Q.F32, Q.F16):
            tensors.append((name, arr.shape, gguf.quants.quantize(arr, qtype), qtype))
        elif arr.ndim == 2 and qtype == Q.F16:
            tensors.append((name, arr.shape, arr.astype(np.float16), Q.F16))
        else:
            tensors.append((name, arr.shape, arr, Q.F32))
    f = io.BytesIO()
    write_ggml(f, "chatglm3", record, tokenizer, tensors)
    return f.getvalue()


@pytest.fixture(scope="module")
def glm():
    return tiny_glm(head_dim=8, heads=8, kv_heads=2)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_round_trip(tmp_path, glm, qtype):
    path = tmp_path / "m.bin"
    path.write_bytes(ggml_bytes(glm, qtype))
    model = load_model(path)
    assert model.config.family == "chatglm3" and model.config.num_kv_heads == 2
    # q8_0: 8-bit weights meet activations rounded to 8 bits too (llama.cpp's numerics, the default route)
    tol = {Q.F32: 1e-4, Q.F16: 5e-3, Q.Q8_0: 3e-2}.get(qtype, 0.25)
    assert rel_err(model.logits(IDS), reference_logits(glm)) < tol


def test_header_is_what_chatglm_cpp_reads(glm):
    data = ggml_bytes(glm, Q.Q8_0, tokenizer=b"TOK")
    assert data[:4] == b"ggml"
    assert np.frombuffer(data[4:12], "<i4").tolist() == [3, 2]          # model type ChatGLM3, config version 2
    fields = np.frombuffer(data[12:64], "<i4")
    assert fields[0] == Q.Q8_0.value and fields[1] == glm.config.vocab_size and fields[4] == 2
    assert data[64:68] == (3).to_bytes(4, "little") and data[68:71] == b"TOK"
    first = data.index(b"transformer.", 71)
    dims_at = first + len("transformer.embedding.word_embeddings.weight")
    assert np.frombuffer(data[dims_at : dims_at + 16], "<i4").tolist() == [2, glm.config.vocab_size,
                                                                            glm.config.hidden_size, Q.Q8_0.value]


def test_damaged_files_name_the_fault(tmp_path, glm):
    data = ggml_bytes(glm, Q.Q4_0)
    path = tmp_path / "bad.bin"
    cases = {
        "truncated": data[: len(data) - 40],
        "unknown model type": data[:4] + (9).to_bytes(4, "little") + data[8:],
        "config version": data[:8] + (7).to_bytes(4, "little") + data[12:],
        "header": data[:10],
    }
    for expected, blob in cases.items():
        path.write_bytes(blob)
        with pytest.raises(ModelFileError, match=expected):
            load_model(path)
