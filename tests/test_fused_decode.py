"""The fused one-token step (kernels/csrc/decode_step.cpp) against the torch blocks it replaces, with the
same ggml-block weights: llama with biases and half-split rotary, GLM-4 with partial interleaved rotary and
grouped keys, GLM-4-0414 with its post norms, GLM-4.5/4.6 (QK norm, a dense first layer, routed and shared
experts), GLM v1 (LayerNorm, per-head q/k/v, 2D rotary, GELU, alpha residuals), a P-Tuning prefix; a batch at mixed positions in scattered cache slots. The torch blocks are checked
against transformers and the official code elsewhere (test_models, test_glm4_families), so equality carries
over. And on the default model, the steps really are fused and agree with llama.cpp."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from chatglm import load_model
from chatglm.kernels import ggml
from chatglm.kernels.ggml import GGMLLinear, fused_decoder
from chatglm.quant import QTensor, QType, quantize

from checkpoints import tiny_glm, tiny_glm4, tiny_glm4_moe, tiny_glm_v1, tiny_llama
from test_paged_cache import paged_decode, scrambled_cache

pytestmark = pytest.mark.skipif(not ggml.available(), reason="the C++ kernels were not built on this machine")

PROMPTS = [[5, 17, 3, 44, 9, 61, 2], [8, 30, 71], [12, 6, 90, 33, 1]]


def blocks_of(w: torch.Tensor, qtype: QType) -> QTensor:
    return QTensor(torch.from_numpy(quantize(w.numpy(), qtype)), qtype, tuple(w.shape))


PRODUCTS = ("qkv", "o", "gate_up", "up", "down")  # the block linears, wherever a family's block holds them


def to_blocks(model, qtype: QType) -> None:
    """Every block linear of a float model as ggml blocks, and the fused step built over them."""
    for block in model.layers:
        for parent in list(block.modules()):
            for name, dense in list(parent.named_children()):
                if name in PRODUCTS:
                    setattr(parent, name, GGMLLinear(blocks_of(dense.weight, qtype), dense.bias, torch.float32))
    model.fused = fused_decoder(model.layers, model.config)
    assert model.fused is not None


def batched_step(model, **cache_args) -> torch.Tensor:
    """Each prompt but its last token alone in a slot, then one step for all three: [3, vocab]."""
    cache = model.new_cache(4, 16, **cache_args)
    random.Random(0).shuffle(cache.free)  # each sequence's blocks out of order
    slots = [3, 0, 2]
    for slot, ids in zip(slots, PROMPTS):
        model(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1)[None], cache, torch.tensor([slot]))
    last = torch.tensor([[ids[-1]] for ids in PROMPTS])
    pos = torch.tensor([[len(ids) - 1] for ids in PROMPTS])
    return model(last, pos, cache, torch.tensor(slots))[:, -1]


def without_fused(model, fn):
    fused, model.fused = model.fused, None
    try:
        return fn(model)
    finally:
        model.fused = fused


@pytest.mark.parametrize("make,qtype", [(lambda: tiny_llama(bias=True), QType.Q8_0), (tiny_glm, QType.Q4_0),
                                         (tiny_glm, QType.Q5_1)], ids=["llama-bias-q8_0", "glm4-q4_0", "glm4-q5_1"])
def test_fused_step_matches_the_torch_blocks(tmp_path, make, qtype):
    make().save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    to_blocks(model, qtype)
    fused = batched_step(model)
    reference = without_fused(model, batched_step)
    assert torch.abs(fused - reference).max() < 1e-4 * torch.abs(reference).max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_step_reads_small_blocks_through_the_table(tmp_path, dtype):
    """Blocks of 2 rows handed out in a scrambled order, stored as float32 or float16 (llama.cpp's cache)."""
    tiny_glm().save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    to_blocks(model, QType.Q4_0)  # (with q8_0 this model puts an activation on an 8-bit rounding edge)
    fused = batched_step(model, block_size=2, dtype=dtype)
    reference = without_fused(model, lambda m: batched_step(m, block_size=2, dtype=dtype))
    assert torch.abs(fused - reference).max() < 1e-4 * torch.abs(reference).max()
    if dtype == torch.float16:  # the rounding of keys and values shows (8-bit activations amplify it), but stays small
        exact = without_fused(model, lambda m: batched_step(m, block_size=2))
        assert 0 < torch.abs(fused - exact).max() < 5e-2 * torch.abs(exact).max()


def test_bfloat16_blocks_take_the_torch_step(tmp_path):
    tiny_glm().save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    to_blocks(model, QType.Q4_0)
    bf16 = batched_step(model, dtype=torch.bfloat16)  # the C++ step reads f32 and f16 only
    exact = batched_step(model)
    assert 0 < torch.abs(bf16 - exact).max() < 5e-2 * torch.abs(exact).max()


def test_fused_step_reads_the_ptuning_prefix(tmp_path):
    tiny_glm().save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    cfg = model.config
    torch.manual_seed(1)
    model.prefix = torch.randn(cfg.num_layers, 2, 4, cfg.num_kv_heads, cfg.head_dim)  # 4 virtual tokens
    to_blocks(model, QType.Q8_0)
    for size in (16, 3):  # the prefix in one shared block; in one shared block and a partial one copied
        fused = batched_step(model, block_size=size)
        reference = without_fused(model, lambda m: batched_step(m, block_size=size))
        assert torch.abs(fused - reference).max() < 1e-4 * torch.abs(reference).max()


def engine_replies_agree(model, prompts: list[list[int]]) -> None:
    """Greedy replies of the prompts decoded together by the engine (continuous batching): the same tokens with the
    one-call step as with the torch blocks, the step taken for the decode steps after each prefill."""
    from chatglm.engine import BatchEngine, SamplingParams

    greedy = SamplingParams(do_sample=False, max_new_tokens=6)

    def replies(m):
        engine = BatchEngine(m, max_batch=len(prompts), max_queue=len(prompts))
        try:
            return [list(r) for r in [engine.submit(p, greedy) for p in prompts]]
        finally:
            engine.close()

    class Counted:  # the step, counting its calls
        def __init__(self, step):
            self.inner, self.calls = step, 0

        def step(self, *args):
            self.calls += 1
            return self.inner.step(*args)

    step, model.fused = model.fused, Counted(model.fused)
    try:
        fused = replies(model)
        assert model.fused.calls >= 5
    finally:
        model.fused = step
    assert fused == without_fused(model, replies)


def fused_and_torch_decode(model, prompts, follow, dtype: torch.dtype) -> None:
    """Prefill, then batched one-token steps at mixed positions over scrambled blocks of 2 rows: every step's
    logits from the fused step equal the torch blocks' (to float32 noise, about 1e-7 here). In a float16 cache
    a key that float32 noise puts on a float16 rounding edge is stored one ulp apart (about 1e-4 of the logits,
    seen once in 18 GLM v1 steps), hence the wider bound there; a wrong rotation or norm is off by far more."""
    tol = 1e-4 if dtype == torch.float32 else 1e-3
    fused = paged_decode(model, prompts, follow, scrambled_cache(model, dtype=dtype))
    reference = without_fused(model, lambda m: paged_decode(m, prompts, follow, scrambled_cache(m, dtype=dtype)))
    for mine, theirs in zip(fused, reference):
        for step, (a, b) in enumerate(zip(mine, theirs)):
            assert np.abs(a - b).max() < tol * np.abs(b).max(), f"step {step}"


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q8_0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_glm4_0414_post_norms_in_the_fused_step(tmp_path, qtype, dtype):
    """GLM-4-0414 / GLM-Z1: RMSNorms on the attention and MLP outputs, partial interleaved rotary, grouped keys."""
    tiny_glm4().save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    assert model.config.post_norms and model.config.rope_dim < model.config.head_dim
    to_blocks(model, qtype)
    rng = np.random.default_rng(1)
    fused_and_torch_decode(model, PROMPTS, [rng.integers(0, 96, 5).tolist() for _ in PROMPTS], dtype=dtype)


# GLM v1 prompts: [gMASK] <sop> (generation: 2D positions (mask position, 1, 2, ...)), plain text (no <sop>:
# positions (p, 0)), and [MASK] <sop>
GLM_V1_PROMPTS = [[0, 5, 6, 1, 2], [5, 6, 7], [7, 7, 5, 0, 0, 5, 3, 2]]


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q8_0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("prefix", [0, 3], ids=["no-prefix", "ptuning"])
def test_glm_v1_block_in_the_fused_step(tmp_path, qtype, dtype, prefix):
    """ChatGLM-6B: LayerNorms with biases, q/k/v per head, 2D rotary, GELU with biases, alpha residuals, and
    P-Tuning v2 rows ahead of each sequence's cache rows."""
    model = load_model(tiny_glm_v1(tmp_path), dtype="f32")
    if prefix:
        cfg = model.config
        torch.manual_seed(1)
        model.prefix = torch.randn(cfg.num_layers, 2, prefix, cfg.num_kv_heads, cfg.head_dim)
    to_blocks(model, qtype)
    rng = np.random.default_rng(1)
    follow = [rng.integers(4, 20, 6).tolist() for _ in GLM_V1_PROMPTS]
    fused_and_torch_decode(model, GLM_V1_PROMPTS, follow, dtype=dtype)


def test_glm_v1_fused_step_takes_2d_positions(tmp_path):
    """The step rotates by the positions it is given: a block position off by one changes the result, so the
    test above could not pass with 2D rotary ignored."""
    model = load_model(tiny_glm_v1(tmp_path), dtype="f32")
    to_blocks(model, QType.Q8_0)
    cache = model.new_cache(1, 16)
    slot = torch.zeros(1, dtype=torch.long)
    model(torch.tensor([[5, 6, 1, 2]]), torch.arange(4)[None], cache, slot)
    x = model.embed(torch.tensor([7]))
    rope, rows, tables = torch.view_as_real(model.rope), torch.tensor([4]), cache.tables[slot]
    right = model.fused.step(x.clone(), cache.kv.clone(), tables, torch.tensor([[2, 2]]), rows, rope)
    wrong = model.fused.step(x.clone(), cache.kv.clone(), tables, torch.tensor([[2, 1]]), rows, rope)
    assert torch.abs(right - wrong).max() > 1e-3 * torch.abs(right).max()
    with pytest.raises(RuntimeError, match="position 64 out of range"):
        model.fused.step(x.clone(), cache.kv, tables, torch.tensor([[2, 64]]), rows, rope)


GLM4_MOE = {  # the tiny default: QK norm, qkv bias, experts in 2 groups of which the best one is kept
    "qk-norm-grouped": {},
    # GLM-4.5-Air's switches: no QK norm, one group, no routed scaling
    "air": dict(use_qk_norm=False, n_group=1, topk_group=1, routed_scaling_factor=1.0),
}


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q8_0], ids=["q4_0", "q8_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32-cache", "f16-cache"])
@pytest.mark.parametrize("name", list(GLM4_MOE))
def test_glm4_moe_in_the_fused_step(tmp_path, name, qtype, dtype):
    """GLM-4.5/4.6: an RMSNorm over each query and key head before partial half-split rotary, a dense first layer
    (its SwiGLU wider than the shared expert after it) and MoE layers whose routed experts add to the shared one;
    batched rows at mixed positions, each expert run once over the rows routed to it."""
    tiny_glm4_moe(**GLM4_MOE[name]).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    cfg = model.config
    assert cfg.moe.dense_layers == (0,) and cfg.rope_dim < cfg.head_dim and not cfg.rope_interleaved
    assert cfg.qk_norm == (name != "air")
    to_blocks(model, qtype)
    rng = np.random.default_rng(1)
    fused_and_torch_decode(model, PROMPTS, [rng.integers(0, 96, 5).tolist() for _ in PROMPTS], dtype=dtype)


def test_glm4_moe_without_a_shared_expert_keeps_the_torch_step(tmp_path):
    """The step's SwiGLU is the shared expert: an MoE layer without one (n_shared_experts 0) says so, and decode
    runs as torch code."""
    tiny_glm4_moe().save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    to_blocks(model, QType.Q8_0)
    model.layers[2].ffn.shared = None
    assert [block.fused_parts() is None for block in model.layers] == [False, False, True]
    assert fused_decoder(model.layers, model.config) is None


def test_bad_moe_layers_are_refused_by_name(tmp_path):
    """A query/key norm of the wrong size, a correction bias that does not fit the experts, impossible routing:
    each is named."""
    tiny_glm4_moe().save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    to_blocks(model, QType.Q8_0)
    cfg, block = model.config, model.layers[1]

    def layer(**change):
        parts = block.fused_parts()
        linears = {n: parts.pop(n) for n in ("qkv", "o", "gate_up", "down")}
        for n, m in linears.items():
            parts.update({n: list(m.parts), f"{n}_type": int(m.qtype), f"{n}_bias": m.bias})
        router, experts = parts.pop("router"), parts.pop("experts")
        parts.update(router=router.weight, router_bias=router.bias, top_k=3, groups=2, top_groups=1,
                     experts_gate_up=[list(e.gate_up.parts) for e in experts], experts_gate_up_type=int(QType.Q8_0),
                     experts_down=[list(e.down.parts) for e in experts], experts_down_type=int(QType.Q8_0))
        parts.update(change)
        return ggml._ggml.DecodeLayer(attn_width=cfg.num_heads * cfg.head_dim, ffn=linears["down"].in_features,
                                      **parts)

    short = block.attn.q_norm[:-1].contiguous()
    with pytest.raises(RuntimeError, match=r"q_norm and k_norm must have head_dim \(8\) values"):
        ggml._ggml.FusedDecoder([layer(q_norm=short, k_norm=short)], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                cfg.rope_dim, False, cfg.norm_eps, 64)
    with pytest.raises(RuntimeError, match="router_bias must be a contiguous CPU float32 tensor of 8 values"):
        layer(router_bias=block.ffn.router.bias[:-1].contiguous())
    with pytest.raises(RuntimeError, match="routing: 3 of 8 experts in 1 of 3 groups is not possible"):
        layer(groups=3)


def test_default_model_decode_steps_agree_with_llama_cpp(default_gguf, llama_cpp):
    """The fused steps on the real model against llama.cpp's logits for the same tokens. (Against our torch
    blocks a step agrees only to the 8-bit activation rounding: this model's outlier activations put some
    codes on a rounding edge that a different summation order flips, as llama.cpp's own threads can.)"""
    text = Path("/usr/share/common-licenses/GPL-3")
    if not text.is_file():
        pytest.skip(f"{text} is absent")
    model = load_model(default_gguf)
    assert model.fused is not None, "the default model's ggml blocks should take the fused step"
    llama = llama_cpp.Llama(model_path=str(default_gguf), n_ctx=600, logits_all=True, verbose=False, n_threads=2)
    tokens = llama.tokenize(text.read_text()[:8000].encode(), add_bos=False, special=False)[:512]
    llama.eval(tokens)
    theirs = np.asarray(llama.scores[16:512], np.float32)
    cache, slot = model.new_cache(1, 512), torch.zeros(1, dtype=torch.long)
    model(torch.tensor([tokens[:16]]), torch.arange(16)[None], cache, slot)
    mine = np.stack([model(torch.tensor([[t]]), torch.tensor([[i]]), cache, slot)[0, -1].numpy()
                     for i, t in enumerate(tokens[16:], start=16)])
    assert np.mean(mine.argmax(-1) == theirs.argmax(-1)) >= 0.95
    targets = torch.tensor(tokens[17:512])
    nll = [float(torch.nn.functional.cross_entropy(torch.from_numpy(x[:-1]).double(), targets)) for x in (mine, theirs)]
    assert abs(np.exp(nll[0]) / np.exp(nll[1]) - 1) < 0.02, f"perplexity {np.exp(nll[0]):.3f} vs llama.cpp {np.exp(nll[1]):.3f}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, QType.Q8_0])
def test_long_contexts_split_into_chunks_match_the_torch_step(tmp_path, dtype):
    """Contexts of several 256-row attention chunks (one ending a row into its last chunk), full 16-row tiles and
    a partial last one, in one batch: the chunks' partial softmaxes merge into torch's attention over the cache
    (q8_0 blocks decoded a tile at a time as torch decodes the gathered pages)."""
    hf = tiny_llama(heads=8, kv_heads=2, head_dim=32)
    hf.config.max_position_embeddings = 1024
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    to_blocks(model, QType.Q8_0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (700, 257, 40)]

    def step(m) -> torch.Tensor:
        cache = m.new_cache(3, 720, dtype=dtype)
        random.Random(0).shuffle(cache.free)
        for slot, ids in enumerate(prompts):
            m(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1)[None], cache, torch.tensor([slot]))
        last = torch.tensor([[ids[-1]] for ids in prompts])
        return m(last, torch.tensor([[len(ids) - 1] for ids in prompts]), cache, torch.arange(3))[:, -1]

    fused = step(model)
    reference = without_fused(model, step)
    assert torch.abs(fused - reference).max() < 1e-4 * torch.abs(reference).max()
