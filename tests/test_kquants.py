"""K-quant GGUFs (Q4_K_M and friends) made by llama.cpp's own quantizer, transcoded at load onto the legacy block
types the C++ kernels run (chatglm/loaders/transcode.py): each tensor's new blocks against gguf.quants' decoding of
the file's blocks, the models' logits and greedy tokens against llama.cpp's on the same files, the one-call decode
step in use, and memory after load about the file's size rather than its float size."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import quants as ggml_quants

from chatglm import load_model
from chatglm.engine import SamplingParams, generate
from chatglm.kernels import ggml
from chatglm.kernels.ggml import GGMLLinear
from chatglm.loaders import build_model, open_checkpoint
from chatglm.loaders.gguf import read_gguf
from chatglm.loaders.transcode import plan, target_of, transcode
from chatglm.quant import DECODERS, QType

from test_convert import llama_cpp_logits
from test_glm4_families import rel_err

pytestmark = pytest.mark.skipif(not ggml.available(), reason="the C++ kernels were not built on this machine")

FTYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "IQ4_XS")  # IQ4_XS: a non-linear type, to q8_0
IDS = [100, 2000, 300, 40, 5000, 6]
# Ours and llama.cpp both round activations to 8 bits before the block products (ours q8_0 blocks of 32, llama.cpp
# q8_K blocks of 256 for K-quant weights), each ~0.4% of a product: on these random tiny models the logits then
# differ by up to ~2% of their largest; the q4_0 synthetic files' tests (test_latent_moe_step.py) allow the same 3%.
LOGIT_TOL = 3e-2
F16_ROUNDING = 2.0 ** -11  # float16 keeps 11 significant bits: rounding moves a value by at most 2^-11 of itself


def quantized(src: Path, mix: str, out: Path) -> Path:
    """`src` quantized by llama.cpp to `mix` once, into `out`."""
    from chatglm.synthetic import llama_quantized

    return out if out.is_file() else llama_quantized(src, mix.lower(), out)


def types_in(path: Path) -> set[str]:
    return {t.tensor_type.name for t in GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kquants")


@pytest.fixture(scope="module")
def glm4_file(llama_cpp, folder):
    """A tiny random GLM-4-0414 (llama.cpp's glm4: widths of 256, what K-quants need) in each K-quant mix."""
    from chatglm.synthetic import synthetic_gguf

    src = synthetic_gguf("glm4-tiny", "f32", folder)
    return lambda ftype: quantized(src, ftype, folder / f"glm4-tiny-{ftype}.gguf")


@pytest.mark.parametrize("ftype", FTYPES)
def test_transcoded_blocks_stay_within_the_bound(glm4_file, ftype):
    """Per tensor, gguf.quants' values of our new blocks against gguf.quants' values of the file's K-quant blocks:
    Q4_K / Q5_K -> q4_1 / q5_1 keep the codes, so a value moves only by the float16 rounding of its sub-block's
    scale and offset, at most 2^-11 * (|d' q| + |m'|); the rest -> q8_0 at most half a q8_0 step (plus the float16
    rounding of the step itself, 127 codes * 2^-11 steps at most)."""
    path = glm4_file(ftype)
    assert {"Q6_K"} <= types_in(path)
    assert {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q3_K_M": "Q3_K", "Q2_K": "Q2_K", "IQ4_XS": "IQ4_XS"}.get(ftype, "Q6_K") \
        in types_in(path)
    file = read_gguf(path)
    checked = set()
    for name, info in file.tensors.items():
        target = target_of(info.qtype)
        if target is None:
            continue
        w = file.tensor(name)
        out = transcode(w, target)
        assert out.qtype == target and out.shape == w.shape
        ref = ggml_quants.dequantize(w.raw.numpy(), w.qtype).reshape(-1, 32)
        got = ggml_quants.dequantize(out.raw.numpy(), out.qtype).reshape(-1, 32)
        a = DECODERS[target](out.raw.reshape(-1, GGML_QUANT_SIZES[target][1]))
        scale = a.scale.float().numpy().reshape(-1, 1)
        if a.offset is not None:  # q4_1 / q5_1 from Q4_K / Q5_K
            offset = a.offset.float().numpy().reshape(-1, 1)
            bound = F16_ROUNDING * (np.abs(a.codes.numpy() * scale) + np.abs(offset)) * (1 + 1e-3)
        else:
            bound = (0.5 + 127 * F16_ROUNDING) * np.abs(scale) * (1 + 1e-3)
        assert np.all(np.abs(got - ref) <= bound + 1e-9), name
        checked.add((info.qtype.name, target.name))
    assert checked >= {("Q6_K", "Q8_0")}


def test_fused_pieces_of_mixed_targets_share_one_type():
    """q, k, v that would end in different block types (Q4_K -> q4_1 beside Q6_K -> q8_0) all become q8_0, so they
    stack into one weight the kernels run; pieces that agree keep their own targets."""
    types = {"q": QType.Q4_K, "k": QType.Q4_K, "v": QType.Q6_K, "gate": QType.Q4_K, "up": QType.Q4_K,
             "down": QType.Q4_0, "norm": QType.F32}
    targets = plan(types, [["q", "k", "v"], ["gate", "up"], ["down"], ["norm"]])
    assert targets == {"q": QType.Q8_0, "k": QType.Q8_0, "v": QType.Q8_0, "gate": QType.Q4_1, "up": QType.Q4_1}


def test_stacking_mixed_block_types_gives_q8_0():
    """Pieces of different block types met while stacking (an expert's gate and up) become one q8_0 weight the
    kernels run, each value within half a q8_0 step of gguf.quants' value of its piece, not a float32 copy."""
    from chatglm.loaders.names import concat_rows
    from chatglm.quant import QTensor, quantize

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 64)).astype(np.float32)
    pieces = [QTensor(torch.from_numpy(quantize(x[i], q)), q, (8, 64)) for i, q in enumerate((QType.Q4_0, QType.Q8_0))]
    stacked = concat_rows(pieces, ["gate", "up"], "test")
    assert stacked.qtype == QType.Q8_0 and stacked.shape == (16, 64)
    assert stacked.parts[1] is pieces[1].raw  # a piece already q8_0 is left where it is
    ref = np.concatenate([ggml_quants.dequantize(p.raw.numpy(), p.qtype).reshape(8, 64) for p in pieces])
    got = ggml_quants.dequantize(stacked.raw.numpy(), QType.Q8_0).reshape(16, 64)
    step = np.abs(ref).reshape(-1, 32).max(-1, keepdims=True) / 127
    assert np.all(np.abs(got - ref).reshape(-1, 32) <= (0.5 + 127 * F16_ROUNDING) * step * (1 + 1e-3))


def all_in_blocks(model) -> None:
    """Every linear is a block linear of a kernel type, and the one-call decode step is built over them."""
    linears = [m for m in model.modules() if isinstance(m, GGMLLinear)]
    assert linears and {m.qtype for m in linears} <= {QType.Q4_1, QType.Q5_1, QType.Q8_0, QType.Q5_0, QType.Q4_0}
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert model.fused is not None


def decode_logits(model, ids: list[int]) -> np.ndarray:
    """One token at a time through the cache (the one-call decode step)."""
    cache, slot = model.new_cache(1, len(ids), dtype=torch.float32), torch.zeros(1, dtype=torch.long)
    return np.stack([model(torch.tensor([[t]]), torch.tensor([[i]]), cache, slot)[0, -1].numpy()
                     for i, t in enumerate(ids)])


def assert_matches_llama_cpp(llama_cpp, path: Path, model) -> None:
    llm = llama_cpp.Llama(str(path), logits_all=True, verbose=False, n_ctx=64, type_k=0, type_v=0)
    try:
        theirs = llama_cpp_logits(llm, IDS)
    finally:
        llm.close()
    assert rel_err(model.logits(IDS), theirs) < LOGIT_TOL
    assert rel_err(decode_logits(model, IDS), theirs) < LOGIT_TOL


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q5_K_M", "Q2_K", "IQ4_XS"])
def test_glm4_k_quants_match_llama_cpp(llama_cpp, glm4_file, ftype):
    path = glm4_file(ftype)
    ckpt = open_checkpoint(path)
    k = {"Q4_K_M": "Q4_K -> q4_1", "Q5_K_M": "Q5_K -> q5_1", "Q2_K": "Q2_K -> q8_0", "IQ4_XS": "IQ4_XS -> q8_0"}[ftype]
    assert "transcoded at load:" in ckpt.placement and k in ckpt.placement
    model = build_model(ckpt)
    all_in_blocks(model)
    assert_matches_llama_cpp(llama_cpp, path, model)


@pytest.mark.parametrize("name", ["glm4-moe-tiny", "glm4-moe-lite-tiny"])
def test_moe_q4_k_m_matches_llama_cpp(llama_cpp, folder, name):
    """GLM-4.5 (llama.cpp's glm4moe) and GLM-4.7-Flash (deepseek2) in Q4_K_M: 3-D expert stacks of Q4_K (each
    expert's gate and up blocks q4_1), the one-call step with the routed experts; GLM-4.5's q in Q4_K beside k and
    v in q8_0 become one q8_0 weight."""
    from chatglm.synthetic import synthetic_gguf

    path = quantized(synthetic_gguf(name, "f32", folder), "Q4_K_M", folder / f"{name}-Q4_K_M.gguf")
    stacks = {t.tensor_type.name for t in GGUFReader(path).tensors if "_exps." in t.name}
    assert "Q4_K" in stacks
    ckpt = open_checkpoint(path)
    assert "Q4_K -> q4_1" in ckpt.placement
    assert ("Q4_K -> q8_0" in ckpt.placement) == (name == "glm4-moe-tiny")
    model = build_model(ckpt)
    all_in_blocks(model)
    experts = [m for n, m in model.named_modules() if ".experts." in n and isinstance(m, GGMLLinear)]
    assert QType.Q4_1 in {m.qtype for m in experts}
    assert_matches_llama_cpp(llama_cpp, path, model)


def test_huge_pages_load_gives_the_same_logits(glm4_file):
    """With use_mmap=False the file's other tensors move into huge pages and the transcoded ones are made in 2 MB
    pages (2 MB-aligned, MADV_HUGEPAGE) where the machine allows: the same model either way."""
    from chatglm.loaders.huge_pages import HUGE, settle, unavailable_reason

    path = glm4_file("Q4_K_M")
    mapped = load_model(path, use_mmap=True).logits(IDS)
    ckpt = open_checkpoint(path, use_mmap=False)
    model = build_model(ckpt)
    settle()
    assert np.array_equal(model.logits(IDS), mapped)
    if unavailable_reason(0) is None:
        assert "(into 2 MB pages)" in ckpt.placement
        big = [p for m in model.modules() if isinstance(m, GGMLLinear) for p in m.parts if p.numel() >= HUGE]
        assert big and all(p.data_ptr() % HUGE == 0 for p in big)  # the embedding and head, transcoded


@pytest.fixture(scope="module")
def default_q4_k_m(llama_cpp, default_gguf, folder) -> Path:
    """The real default model (SmolLM2-135M) requantized to Q4_K_M by llama.cpp: its 1536-wide ffn_down in Q4_K and
    Q6_K (its 576-wide matrices fall back to q5_0 / q8_0, v beside q5_0 q and k: q, k, v all q8_0)."""
    path = quantized(default_gguf, "Q4_K_M", folder / "smollm2-Q4_K_M.gguf")
    assert {"Q4_K", "Q6_K"} <= types_in(path)
    return path


def test_real_model_greedy_tokens_match_llama_cpp(llama_cpp, default_q4_k_m):
    model = load_model(default_q4_k_m)
    all_in_blocks(model)
    llm = llama_cpp.Llama(str(default_q4_k_m), n_ctx=128, verbose=False, n_threads=2)
    try:
        prompt = llm.tokenize(b"<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
                              add_bos=False, special=True)
        theirs = [t for _, t in zip(range(12), llm.generate(prompt, temp=0.0, top_k=1))]
    finally:
        llm.close()
    mine = list(generate(model, prompt, SamplingParams(do_sample=False, max_new_tokens=12)))
    assert mine == theirs


MEMORY = """import json, re, resource, sys
from chatglm.loaders import build_model, open_checkpoint
def rss(): return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
def peak(): return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
ckpt = open_checkpoint(sys.argv[1])
before = rss()
model = build_model(ckpt)
print(json.dumps({"before": before, "peak": peak(), "after": rss(), "fused": model.fused is not None}))
"""


def test_memory_after_load_is_about_the_file_size(llama_cpp, folder):
    """A 24-layer tiny GLM-4 in Q4_K_M (float32: 5x the file): the load's peak and what stays after it under 2x the
    file, not its float size (the transcoded copy replaces the file pages it was read from; the rest is the
    load's fixed costs, which weigh more in a 28 MB file than in a real one)."""
    from chatglm.synthetic import synthetic_gguf

    src = synthetic_gguf("glm4-tiny", "f32", folder, layers=24)
    path = quantized(src, "Q4_K_M", folder / "glm4-tiny-24l-Q4_K_M.gguf")
    size, float_size = path.stat().st_size, src.stat().st_size
    assert float_size > 4 * size
    # VmHWM, this process image's peak (ru_maxrss would keep the forking test process's across exec)
    run = subprocess.run([sys.executable, "-c", MEMORY, str(path)], capture_output=True, text=True, check=True)
    got = json.loads(run.stdout)
    assert got["fused"]
    assert got["peak"] - got["before"] < 2 * size, got  # measured: 1.5x (the transcoded copy is 1.1x)
    assert got["after"] - got["before"] < 2 * size, got


def test_convert_writes_a_loaded_k_quant_model(glm4_file, folder):
    """`convert` reads a K-quant file through the same loader (its transcoded blocks) and writes legacy blocks."""
    from chatglm.convert import convert

    src = glm4_file("Q4_K_M")
    out = convert(src, folder / "from-q4_k_m-q8_0.gguf", "q8_0", progress=False)
    assert rel_err(load_model(out).logits(IDS), load_model(src).logits(IDS)) < LOGIT_TOL


def test_a_damaged_k_quant_scale_names_the_tensor(glm4_file, folder):
    """A NaN super-block scale in a Q4_K tensor carries into its q4_1 scales: one error naming the file and tensor."""
    from chatglm.errors import ModelFileError

    path = folder / "damaged-Q4_K_M.gguf"
    path.write_bytes(glm4_file("Q4_K_M").read_bytes())
    file = read_gguf(path)
    name = next(n for n, t in file.tensors.items() if t.qtype == QType.Q4_K and n.startswith("blk."))
    at = file.tensors[name].start
    file.buffer.close()
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(np.float16(np.nan).tobytes())
    with pytest.raises(ModelFileError, match=f"{name}.*NaN or infinite block scales"):
        load_model(path)
