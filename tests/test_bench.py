"""`chatglm bench`: a synthetic file of a given shape, measured by us and by llama.cpp in one run."""
from __future__ import annotations

import json
import subprocess
import sys

import gguf
import pytest
import sentencepiece as spm

from chatglm import load_model
from chatglm.kernels import ggml
from chatglm.loaders import open_checkpoint
from chatglm.synthetic import synthetic_file, synthetic_gguf


def test_synthetic_file_loads_here_and_in_llama_cpp(tmp_path, default_gguf, llama_cpp):
    path = synthetic_gguf("chatglm-tiny", "q4_0", tmp_path)
    assert synthetic_gguf("chatglm-tiny", "q4_0", tmp_path) == path  # made once
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "chatglm"
    model = load_model(path)
    assert model.config.num_kv_heads == 2 and model.config.rope_dim == 32
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)
    assert llm.n_vocab() == 49152


def test_bench_json_with_llama_cpp(tmp_path, default_gguf, llama_cpp):
    proc = subprocess.run([sys.executable, "-m", "chatglm", "bench", "--synthetic", "chatglm-tiny",
                           "--synthetic-dir", str(tmp_path), "--prompt-tokens", "16", "--new-tokens", "4",
                           "--compare", "llama.cpp", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("decode_tok_s", "prefill_tok_s", "load_s", "peak_rss_mb", "decode_ratio"):
        assert result[key] > 0, key
    assert result["llama_cpp"]["engine"] == "llama.cpp"


def test_synthetic_glm_v1_is_a_chatglm_cpp_file_with_ice_texts_special_ids(tmp_path, shared_dir):
    """ChatGLM-6B's shape as chatglm.cpp's GGML .bin (GLM v1 has no llama.cpp architecture): its tokenizer has
    the real ice_text.model's piece count and control pieces at the same ids, which chatglm.cpp looks up."""
    path = synthetic_file("chatglm-6b-tiny", "q4_0", tmp_path)
    assert path.suffix == ".bin" and synthetic_file("chatglm-6b-tiny", "q4_0", tmp_path) == path  # made once
    with open(path, "rb") as f:
        assert f.read(4) == b"ggml" and int.from_bytes(f.read(4), "little") == 1  # chatglm.cpp's ChatGLM-6B type
    real = spm.SentencePieceProcessor(model_file=str(shared_dir / "tokenizers" / "chatglm-6b" / "ice_text.model"))
    ckpt = open_checkpoint(path)
    sp = ckpt.load_tokenizer()._sp
    assert sp.get_piece_size() == real.get_piece_size()
    for piece in ("<s>", "</s>", "<pad>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"):
        assert sp.piece_to_id(piece) == real.piece_to_id(piece) and sp.is_control(real.piece_to_id(piece))
    cfg = ckpt.config
    assert (cfg.extra["gmask"], cfg.bos_token_id) == (real.piece_to_id("[gMASK]"), real.piece_to_id("<sop>"))


@pytest.mark.skipif(not ggml.available(), reason="the C++ kernels were not built on this machine")
def test_bench_glm_v1_decodes_in_the_fused_step(tmp_path):
    args = [sys.executable, "-m", "chatglm", "bench", "--synthetic", "chatglm-6b-tiny", "--synthetic-dir",
            str(tmp_path), "--prompt-tokens", "16", "--new-tokens", "4", "--json"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["fused_step"] is True and result["decode_tok_s"] > 0
    proc = subprocess.run(args + ["--compare", "llama.cpp"], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "chatglm.cpp's GGML format" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(not ggml.available(), reason="the C++ kernels were not built on this machine")
def test_synthetic_glm4_0414_takes_the_fused_step(tmp_path, default_gguf):
    """GLM-4-0414's blocks as llama.cpp's glm4 file lays them out (q, k, v apart, post norms) decode in one call."""
    model = load_model(synthetic_gguf("glm4-tiny", "q4_0", tmp_path))
    assert model.config.post_norms and model.fused is not None
