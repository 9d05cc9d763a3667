"""`chatglm bench`: a synthetic file of a given shape, measured by us and by llama.cpp in one run."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import gguf
import pytest
import sentencepiece as spm
import torch

from chatglm import bench, load_model
from chatglm.cli import main
from chatglm.kernels import ggml
from chatglm.kv_cache import KV_TYPES, format_size
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


def test_fewer_layers_keep_the_widths(tmp_path, default_gguf):
    full = load_model(synthetic_gguf("glm4-tiny", "q4_0", tmp_path)).config
    one = load_model(synthetic_gguf("glm4-tiny", "q4_0", tmp_path, layers=1)).config
    assert (one.num_layers, full.num_layers) == (1, 2)
    assert (one.hidden_size, one.num_kv_heads, one.head_dim) == (full.hidden_size, full.num_kv_heads, full.head_dim)


def test_bench_json_with_llama_cpp(tmp_path, default_gguf, llama_cpp):
    proc = subprocess.run([sys.executable, "-m", "chatglm", "bench", "--synthetic", "chatglm-tiny",
                           "--synthetic-dir", str(tmp_path), "--prompt-tokens", "16", "--new-tokens", "4",
                           "--compare", "llama.cpp", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("decode_tok_s", "prefill_tok_s", "load_s", "peak_rss_mb", "decode_ratio", "kv_bytes_per_token"):
        assert result[key] > 0, key
    assert result["llama_cpp"]["engine"] == "llama.cpp" and result["alternated"] is True and result["rounds"] == 3


class Clocked:
    """A stand-in engine whose every prefill and decode takes `seconds` and logs the call."""

    def __init__(self, name: str, seconds: list[float], log: list[str]) -> None:
        self.name, self.seconds, self.log = name, iter(seconds), log

    def prefill(self) -> float:
        self.log.append(self.name)
        return 1.0

    def decode(self, steps: int) -> float:
        return next(self.seconds)


def test_rounds_alternate_and_each_ratio_is_taken_against_its_neighbour():
    """The peer runs beside ours a round at a time, each going first in turn; the bus's swings (here the 3rd round
    twice as slow for both) cancel in each round's ratio, so the median ratio is the engines' true 1.25."""
    log: list[str] = []
    ours = Clocked("ours", [0.8, 0.8, 1.6, 0.8], log)
    peer = Clocked("peer", [1.0, 1.0, 2.0, 1.0], log)
    times = bench.timed_rounds([ours, peer], 4, 8)
    assert log == ["ours", "peer", "peer", "ours", "ours", "peer", "peer", "ours"]
    assert bench.ratio(times[0]["decode"], times[1]["decode"], alternated=True) == 1.25
    assert bench.ratio([0.8, 0.8, 1.6], [2.0, 2.0, 2.0], alternated=False) == 2.5  # the medians', one after the other
    assert bench.speeds(times[0], 16, 8) == {"prefill_tok_s": 16.0, "decode_tok_s": 10.0}


def test_bench_runs_llama_cpp_after_ours_when_two_copies_do_not_fit(tmp_path, default_gguf, llama_cpp, monkeypatch,
                                                                    capsys):
    monkeypatch.setattr(bench, "available_memory", lambda: bench.RESERVE)  # no room for two copies beside it
    args = ["bench", "--synthetic", "chatglm-tiny", "--synthetic-dir", str(tmp_path), "--prompt-tokens", "16",
            "--new-tokens", "4", "--rounds", "2", "--compare", "llama.cpp", "--json"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["alternated"] is False and "not alternating" in err
    assert result["llama_cpp"]["decode_tok_s"] > 0 and result["decode_ratio"] > 0
    assert main(args[:-5] + ["--rounds", "0"]) == 1
    assert "--rounds 0: expected at least 1" in capsys.readouterr().err


def test_bench_busy_runs_a_pinned_spinner_beside_both_engines_and_stops_it(tmp_path, default_gguf, llama_cpp):
    proc = subprocess.run([sys.executable, "-m", "chatglm", "bench", "--synthetic", "chatglm-tiny", "--busy",
                           "--synthetic-dir", str(tmp_path), "--prompt-tokens", "16", "--new-tokens", "4",
                           "--compare", "llama.cpp", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["busy_core_cpu_s"] > 0 and result["decode_ratio"] > 0
    spinning = subprocess.run(["pgrep", "-f", "sched_setaffinity"], capture_output=True, text=True).stdout
    assert spinning == "", "the spinner outlived the bench"


def test_bench_q8_0_cache_beside_llama_cpps(tmp_path, default_gguf, llama_cpp):
    """`--kv-type q8_0` reports its bytes per token and gives llama.cpp the same cache (type_k = type_v = q8_0)."""
    proc = subprocess.run([sys.executable, "-m", "chatglm", "bench", "--synthetic", "chatglm-tiny",
                           "--synthetic-dir", str(tmp_path), "--prompt-tokens", "16", "--new-tokens", "4",
                           "--kv-type", "q8_0", "--compare", "llama.cpp", "--json"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kv_type"] == "q8_0" and result["fused_step"] is True
    assert result["kv_bytes_per_token"] == pytest.approx(llama_cpp_kv_bytes_per_token(result["model"], q8_0=True),
                                                         abs=LOG_ROUNDING)
    assert result["llama_cpp"]["decode_tok_s"] > 0


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


LOG_ROUNDING = 0.005 * 2**20 / 4096  # llama.cpp logs the cache's MiB to 2 decimals: 1.3 bytes a token of 4096 cells


def llama_cpp_kv_bytes_per_token(path, cells: int = 4096, q8_0: bool = False) -> float:
    """What llama.cpp allocates per token for its default (f16) cache, or with `-ctk q8_0 -ctv q8_0` (type 8; its
    quantized values need flash attention): its verbose load log's KV size line."""
    quantized = ", type_k=8, type_v=8, flash_attn=True" if q8_0 else ""
    code = (f"import llama_cpp; llama_cpp.Llama(model_path={str(path)!r}, n_ctx={cells}, n_batch=32, verbose=True"
            f"{quantized})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    size = re.search(r"kv_cache: size = +([0-9.]+) MiB \( *(\d+) cells", proc.stderr)
    assert size, proc.stderr[-2000:]
    return float(size.group(1)) * 2**20 / int(size.group(2))


@pytest.mark.parametrize("name", ["chatglm-tiny", "glm4-tiny", "glm4-moe-tiny", "glm4-moe-lite-tiny", "default"])
def test_f16_cache_takes_what_llama_cpp_allocates_per_token(tmp_path, default_gguf, llama_cpp, name):
    """The shared decoder's keys and values, GLM-4-0414's and GLM-4.5's, and GLM-4.7-Flash's latent rows (llama.cpp keeps no
    values for it either), as `chatglm bench` and the serve banner report them."""
    path = default_gguf if name == "default" else synthetic_gguf(name, "q4_0", tmp_path)
    cache = load_model(path).new_cache(1, 16)
    assert cache.kv.dtype == torch.float16  # block files: f16 by default, as llama.cpp
    assert cache.token_bytes() == llama_cpp_kv_bytes_per_token(path)
    assert f"{format_size(cache.token_bytes())} per token" in cache.describe()


@pytest.mark.parametrize("name", ["chatglm-tiny", "glm4-tiny", "default"])
def test_q8_0_cache_takes_what_llama_cpp_allocates_per_token(tmp_path, default_gguf, llama_cpp, name):
    """--kv-type q8_0 against llama.cpp's -ctk q8_0 -ctv q8_0: 34 bytes per 32 keys or values, 53% of f16's."""
    path = default_gguf if name == "default" else synthetic_gguf(name, "q4_0", tmp_path)
    cache = load_model(path).new_cache(1, 16, dtype=KV_TYPES["q8_0"])
    assert cache.token_bytes() == pytest.approx(llama_cpp_kv_bytes_per_token(path, q8_0=True), abs=LOG_ROUNDING)
    assert "q8_0 in" in cache.describe() and f"{format_size(cache.token_bytes())} per token" in cache.describe()
