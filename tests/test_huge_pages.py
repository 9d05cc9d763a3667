"""--no-mmap: a file's weights moved into huge pages, in place, give the very logits the mapped file gives, while
they move and after; MoE experts stay mapped; where huge pages cannot be had the weights stay mapped, no error."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from chatglm import Pipeline, load_model
from chatglm.cli import build_parser
from chatglm.loaders import huge_pages, open_checkpoint
from chatglm.loaders.huge_pages import HUGE, address_of, mmap_option, settle, thp_mode, windows
from chatglm.synthetic import synthetic_file, synthetic_gguf

from test_models import IDS

needs_thp = pytest.mark.skipif(thp_mode() not in ("always", "madvise"),
                               reason=f"transparent huge pages are {thp_mode()!r} on this machine")


def huge_pages_in(lo: int, hi: int) -> int:
    """Bytes of [lo, hi) this process has in anonymous huge pages (AnonHugePages in /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start < hi and lo < end
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1]) * 1024
    return total


def file_backed(lo: int, hi: int) -> bool:
    """Whether every mapping of this process over [lo, hi) is a file's (nothing there moved to anonymous pages)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start < hi and lo < end and len(fields) < 6:
                return False
    return True


def moved_and_same(path) -> tuple[int, int]:
    """Load mapped and with use_mmap=False: the logits equal while the weights move and after; the bytes of the
    file's mapping (a GGML file's largest tensor) that ended in huge pages, and its size."""
    mapped, ckpt = load_model(path), open_checkpoint(path, use_mmap=False)
    from chatglm.loaders import build_model

    moving = build_model(ckpt)
    assert ckpt.placement.startswith("weights moving into 2 MB pages in the background (")
    reference = mapped.logits(IDS)
    assert np.array_equal(moving.logits(IDS), reference)  # most likely mid-move
    settle()
    assert np.array_equal(moving.logits(IDS), reference)
    if ckpt.format == "gguf":
        base, size = address_of(ckpt.get.__self__.buffer), len(ckpt.get.__self__.buffer)
    else:  # a GGML .bin: its largest tensor (the checkpoint reads from the dict of its tensors)
        raw = max((getattr(w, "raw", w) for w in ckpt.get.__self__.values()), key=lambda t: t.numel())
        base, size = raw.data_ptr(), raw.numel() * raw.element_size()
    return huge_pages_in(base, base + size), size


@needs_thp
def test_gguf_weights_move_into_huge_pages_with_the_same_logits(tmp_path, default_gguf):
    huge, size = moved_and_same(synthetic_gguf("chatglm-tiny", "q4_0", tmp_path))
    assert huge >= size - 3 * HUGE  # all but the header (its vocabulary: 1.8 MB) and the partial pages at the ends


@needs_thp
def test_ggml_bin_weights_move_with_the_same_logits(tmp_path):
    path = synthetic_file("chatglm-6b-tiny", "q4_0", tmp_path)  # chatglm.cpp's GGML .bin, 26 MB
    huge, size = moved_and_same(path)
    assert size > 4 * HUGE and huge >= size - 2 * HUGE


@needs_thp
def test_moe_experts_stay_mapped(tmp_path, default_gguf):
    """Only a token's chosen experts are read: moving them all would take the whole file's size in memory."""
    path = synthetic_gguf("glm4-moe-lite-tiny", "q4_0", tmp_path)
    moved_and_same(path)
    file = open_checkpoint(path, use_mmap=False).get.__self__
    settle()
    base = address_of(file.buffer)
    experts = [t for name, t in file.tensors.items() if "_exps." in name]
    assert experts and all(file_backed(base + t.start, base + t.start + t.nbytes) for t in experts)
    embedding = file.tensors["token_embd.weight"]  # 7 MB: its whole 2 MB pages moved
    assert huge_pages_in(base + embedding.start, base + embedding.start + embedding.nbytes) >= 4 << 20


def test_windows_are_whole_huge_pages_inside_the_spans():
    H = HUGE
    base = 5 * H  # spans: two meeting but for 32 bytes of padding (file offsets 100 .. 3H + 36 MB + 132), a gap,
    spans = [(100, 3 * H), (3 * H + 132, 18 * H), (100 * H, H + 10)]  # then one of just over a page
    # addresses 5H + 100 .. 26H + 132 hold the whole pages 6H .. 26H (in 64 MB = 32-page pieces); 105H .. 106H
    assert windows(base, spans) == [(6 * H, 20 * H), (105 * H, H)]
    assert windows(base, [(0, 64 * H)]) == [(5 * H, 32 * H), (37 * H, 32 * H)]
    assert windows(base, [(100, H)]) == []  # no whole 2 MB page inside


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
    settle()
    buffer = open_checkpoint(path, use_mmap=False).get.__self__.buffer
    assert file_backed(address_of(buffer), address_of(buffer) + len(buffer))
    assert np.array_equal(load_model(path, use_mmap=False).logits(IDS), load_model(path).logits(IDS))


@needs_thp
def test_a_move_that_fails_leaves_the_weights_mapped_and_says_so(tmp_path, default_gguf, monkeypatch, caplog):
    def refused(*args) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(huge_pages, "_move", refused)
    path = synthetic_gguf("chatglm-tiny", "q4_0", tmp_path)
    model = load_model(path, use_mmap=False)
    settle()
    assert "weights left in the file's mapping from address" in caplog.text and "Cannot allocate" in caplog.text
    assert np.array_equal(model.logits(IDS), load_model(path).logits(IDS))


@needs_thp
def test_the_chat_banner_says_where_the_weights_are(tmp_path, default_gguf):
    from chatglm.agent import Agent
    from chatglm.terminal import Terminal

    path = synthetic_gguf("chatglm-tiny", "q4_0", tmp_path)
    for use_mmap, said in ((False, "; weights moving into 2 MB pages in the background ("),
                           (True, "; weights mapped from the file.")):
        assert said in Terminal(Agent(Pipeline(path, use_mmap=use_mmap), [], None, None)).banner(False)
    settle()


def test_the_option_parses_and_a_bad_value_is_refused(default_gguf):
    parser = build_parser()
    for command in (["chat"], ["serve"], ["bench"], ["perplexity", "-f", "x.txt"]):
        # not told: the device decides (moved on a CPU, mapped for a GPU); serve's replicas share the mapped pages
        assert parser.parse_args(command).use_mmap is None
        assert parser.parse_args([*command, "--no-mmap"]).use_mmap is False
        assert parser.parse_args([*command, "--mmap"]).use_mmap is True
    assert [mmap_option(None, device) for device in ("cpu", "cuda", "cuda:1")] == [False, True, True]
    with pytest.raises(ValueError, match=r"use_mmap \(--mmap/--no-mmap\) is 'no'; expected true .* or false"):
        Pipeline(default_gguf, use_mmap="no")
    proc = subprocess.run([sys.executable, "-m", "chatglm", "chat", "--mmap=no", "-p", "hi"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--mmap/--no-mmap: ignored explicit argument 'no'" in proc.stderr
    assert "Traceback" not in proc.stderr


@needs_thp
def test_bench_waits_for_the_move_and_says_where_the_weights_were(tmp_path, default_gguf, llama_cpp):
    """Not told, bench on a CPU moves our weights and runs llama.cpp as it runs by default (mapped, q4_0 repacked into
    memory): each engine as users get it."""
    proc = subprocess.run([sys.executable, "-m", "chatglm", "bench", "--synthetic", "chatglm-tiny", "--synthetic-dir",
                           str(tmp_path), "--prompt-tokens", "16", "--new-tokens", "4", "--compare",
                           "llama.cpp", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["weights"].startswith("weights moving into 2 MB pages") and result["weights_moved_s"] >= 0
    assert result["llama_cpp"]["use_mmap"] is True and result["decode_tok_s"] > 0
