"""--no-mmap: a file's weights copied into huge pages give the very logits the mapped file gives; MoE experts
stay mapped; where huge pages cannot be had the weights stay mapped, with no error."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from chatglm import Pipeline, load_model
from chatglm.cli import build_parser
from chatglm.loaders import huge_pages, open_checkpoint
from chatglm.loaders.huge_pages import HugePageArena, huge_pages_of, thp_mode
from chatglm.synthetic import synthetic_gguf

from checkpoints import tiny_glm
from test_ggml import ggml_bytes
from test_models import IDS

needs_thp = pytest.mark.skipif(thp_mode() not in ("always", "madvise"),
                               reason=f"transparent huge pages are {thp_mode()!r} on this machine")


def inside(w, buffer) -> bool:
    """Whether a tensor's bytes (a QTensor's blocks) lie in this buffer (a file's mapping)."""
    base = np.frombuffer(buffer, np.uint8).ctypes.data
    return base <= getattr(w, "raw", w).data_ptr() < base + len(buffer)


def same_logits(path) -> None:
    mapped, copied = load_model(path), load_model(path, use_mmap=False)
    assert np.array_equal(copied.logits(IDS), mapped.logits(IDS))


@needs_thp
def test_gguf_copied_gives_the_mapped_logits_bit_for_bit(tmp_path, default_gguf):
    path = synthetic_gguf("chatglm-tiny", "q4_0", tmp_path)
    ckpt = open_checkpoint(path, use_mmap=False)
    file = ckpt.get.__self__  # the GGUFFile behind the checkpoint
    assert ckpt.placement.startswith("weights in huge pages") and set(file.copies) == set(file.tensors)
    assert not any(inside(file.tensor(name), file.buffer) for name in file.tensors)
    same_logits(path)


@needs_thp
def test_ggml_bin_copied_gives_the_mapped_logits_bit_for_bit(tmp_path):
    path = tmp_path / "m.bin"
    path.write_bytes(ggml_bytes(tiny_glm(head_dim=8, heads=8, kv_heads=2), Q.Q4_0))
    assert open_checkpoint(path, use_mmap=False).placement.startswith("weights in huge pages")
    same_logits(path)


@needs_thp
def test_the_chat_banner_says_where_the_weights_are(tmp_path, default_gguf):
    from chatglm.agent import Agent
    from chatglm.terminal import Terminal

    path = synthetic_gguf("chatglm-tiny", "q4_0", tmp_path)
    for use_mmap, said in ((False, "; weights in huge pages ("), (True, "; weights mapped from the file.")):
        assert said in Terminal(Agent(Pipeline(path, use_mmap=use_mmap), [], None, None)).banner(False)


@needs_thp
def test_moe_experts_stay_mapped(tmp_path, default_gguf):
    """Only a token's chosen experts are read: copying them all would double a MoE file's memory."""
    path = synthetic_gguf("glm4-moe-lite-tiny", "q4_0", tmp_path)
    file = open_checkpoint(path, use_mmap=False).get.__self__
    experts = [name for name, t in file.tensors.items() if len(t.shape) == 3]
    assert experts and not set(experts) & set(file.copies)
    assert all(inside(file.tensor(name), file.buffer) for name in experts)
    assert set(file.copies) == set(file.tensors) - set(experts)
    assert not any(inside(file.tensor(name), file.buffer) for name in file.copies)
    same_logits(path)


@needs_thp
def test_the_buffer_really_is_in_huge_pages():
    arena = HugePageArena(8 << 20)
    arena.take(8 << 20).fill_(1)
    assert arena.address % (2 << 20) == 0 and huge_pages_of(arena) >= 2 << 20


@pytest.mark.parametrize("fault, reason", [
    ({"thp_mode": lambda: "never"}, "transparent huge pages are 'never' on this machine"),
    ({"available_memory": lambda: 0}, "would leave less than 1024 MiB of the 0 MiB available"),
])
def test_without_huge_pages_the_weights_stay_mapped(tmp_path, default_gguf, monkeypatch, fault, reason):
    path = synthetic_gguf("chatglm-tiny", "q4_0", tmp_path)
    for name, check in fault.items():
        monkeypatch.setattr(huge_pages, name, check)
    pipe = Pipeline(path, use_mmap=False)
    assert pipe.placement.startswith("weights mapped from the file (") and pipe.placement.endswith(f"{reason})")
    file = open_checkpoint(path, use_mmap=False).get.__self__
    assert file.copies == {} and inside(file.tensor("blk.0.attn_qkv.weight"), file.buffer)
    assert np.array_equal(load_model(path, use_mmap=False).logits(IDS), load_model(path).logits(IDS))


def test_the_option_parses_and_a_bad_value_is_refused(default_gguf):
    parser = build_parser()
    for command in (["chat"], ["serve"], ["bench"], ["perplexity", "-f", "x.txt"]):
        assert parser.parse_args(command).use_mmap is True
        assert parser.parse_args([*command, "--no-mmap"]).use_mmap is False
    with pytest.raises(ValueError, match=r"use_mmap \(--mmap/--no-mmap\) is 'no'; expected true .* or false"):
        Pipeline(default_gguf, use_mmap="no")
    proc = subprocess.run([sys.executable, "-m", "chatglm", "chat", "--mmap=no", "-p", "hi"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--mmap/--no-mmap: ignored explicit argument 'no'" in proc.stderr
    assert "Traceback" not in proc.stderr


@needs_thp
def test_bench_says_where_the_weights_were_for_both_engines(tmp_path, default_gguf, llama_cpp):
    proc = subprocess.run([sys.executable, "-m", "chatglm", "bench", "--synthetic", "chatglm-tiny", "--synthetic-dir",
                           str(tmp_path), "--prompt-tokens", "16", "--new-tokens", "4", "--no-mmap", "--compare",
                           "llama.cpp", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["weights"].startswith("weights in huge pages") and result["llama_cpp"]["use_mmap"] is False
    assert result["decode_tok_s"] > 0 and result["llama_cpp"]["decode_tok_s"] > 0
