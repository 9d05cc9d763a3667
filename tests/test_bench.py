"""`chatglm bench`: a synthetic file of a given shape, measured by us and by llama.cpp in one run."""
from __future__ import annotations

import json
import subprocess
import sys

import gguf

from chatglm import load_model
from chatglm.synthetic import synthetic_gguf


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
