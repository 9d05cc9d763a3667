"""`--kv-type q8_0`: keys and values stored as ggml q8_0 blocks (llama.cpp's -ctk q8_0 -ctv q8_0). The blocks are
gguf.quants' bytes for the rows written (by the torch prefill and by the C++ one-token step alike), both attention
paths read them alike, the replies stay close to a float16 cache's, and what cannot hold them says so."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from gguf import quants as ggml_quants

from chatglm import load_model
from chatglm.cli import main
from chatglm.engine import BatchEngine, SamplingParams, generate
from chatglm.kernels import ggml
from chatglm.kv_cache import KV_TYPES, KVCache, KVTypeError, format_size
from chatglm.quant import QType, q8_0_bytes, q8_0_values
from chatglm.pipeline import Pipeline
from chatglm.server import create_app
from chatglm.server.app import KVSettings
from chatglm.synthetic import synthetic_gguf

from checkpoints import tiny_glm, tiny_glm_v1, tiny_llama
from test_fused_decode import GLM_V1_PROMPTS, batched_step, fused_and_torch_decode, to_blocks, without_fused
from test_paged_cache import SLOTS, paged_decode, scrambled_cache

Q8_0 = KV_TYPES["q8_0"]
needs_kernels = pytest.mark.skipif(not ggml.available(), reason="the C++ kernels were not built on this machine")


def test_q8_0_bytes_are_gguf_quants_bytes():
    """Random rows, an all-zero block, a tiny one, and codes exactly halfway (2.5 -> 3, -3.5 -> -4: C's roundf)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 128, generator=g) * torch.logspace(-4, 3, 6)[:, None, None]
    x[0, 0, :32] = 0
    x[1, 1, 32:64] = 1e-30
    x[2, 2, :32] = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5] + [1.5] * 27)
    ours = q8_0_bytes(x)
    assert ours.shape == (6, 3, 128 // 32 * 34) and ours.dtype == torch.uint8
    theirs = ggml_quants.quantize(x.numpy(), QType.Q8_0)
    assert np.array_equal(ours.numpy(), theirs)
    assert torch.equal(q8_0_values(ours), torch.from_numpy(ggml_quants.dequantize(theirs, QType.Q8_0)))


def test_a_q8_0_block_takes_34_bytes_per_32_values(tmp_path):
    tiny_llama(head_dim=32).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    cfg = model.config
    cache = model.new_cache(1, 16, dtype=Q8_0)
    assert cache.kv.dtype == torch.uint8 and cache.kv_type == Q8_0
    assert cache.token_bytes() == cfg.num_layers * 2 * cfg.num_kv_heads * 34 == KVCache.block_bytes(cfg, Q8_0, 1)
    half = model.new_cache(1, 16, dtype=torch.float16).token_bytes()
    assert cache.token_bytes() / half == 34 / 64  # 53% of f16's bytes
    assert "q8_0 in" in cache.describe() and f"{format_size(cache.token_bytes())} per token" in cache.describe()


def layer0_rows(model, kv_type, prompts, follow):
    """Prefill then decode at mixed positions in scrambled blocks; the first layer's keys and values of every row
    written, per slot: [rows, 2, kv_heads, storage width]. (The first layer's rows depend on the tokens alone, not on
    how the cache rounded earlier rows, so a float32 cache holds exactly the values the q8_0 cache quantized.)"""
    cache = scrambled_cache(model, dtype=kv_type)
    paged_decode(model, prompts, follow, cache)
    out = []
    for slot, ids in zip(SLOTS, prompts):
        rows = torch.arange(len(ids) + len(follow[0]))
        blocks = cache.tables[slot, rows // cache.block_size]
        out.append(cache.kv[0][:, :, blocks, rows % cache.block_size].permute(2, 0, 1, 3))
    return out


PROMPTS, FOLLOW = [[5, 17, 3, 44, 9], [8, 30, 71], [12, 6, 90, 33, 1, 7, 2]], [[4, 9, 2], [60, 3, 8], [11, 5, 7]]


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
def test_written_rows_are_gguf_quants_q8_0(tmp_path, fused):
    """Every row the prefill (torch) and the one-token steps (torch, or the C++ step) write: gguf.quants' q8_0
    bytes of the float32 keys and values, bit for bit."""
    if fused and not ggml.available():
        pytest.skip("the C++ kernels were not built on this machine")
    tiny_llama(heads=4, kv_heads=2, head_dim=64).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    to_blocks(model, QType.Q4_0)
    if not fused:
        model.fused = None
    quantized = layer0_rows(model, Q8_0, PROMPTS, FOLLOW)
    exact = layer0_rows(model, torch.float32, PROMPTS, FOLLOW)
    for mine, rows in zip(quantized, exact):
        expected = ggml_quants.quantize(rows.numpy(), QType.Q8_0)
        assert np.array_equal(mine.numpy(), expected)


@needs_kernels
def test_fused_step_reads_q8_0_blocks_as_the_torch_step(tmp_path):
    """Blocks of 2 rows in a scrambled order, several one-token steps at mixed positions: the C++ step's logits
    equal torch's over the same q8_0 cache. Both quantize the same float32 rows as ggml does and decode them exactly,
    so they differ by float32 noise (about 1e-7 of the logits) unless that noise puts a value on a rounding edge
    between two codes (one code is 1/127 of a block's largest value): the bound of the float16 cache's test."""
    tiny_llama(heads=8, kv_heads=2, head_dim=32).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    to_blocks(model, QType.Q4_0)
    prompts = [[5, 17, 3, 44, 9, 61, 2, 8, 19], [8, 30, 71], [12, 6, 90, 33, 1]]
    fused_and_torch_decode(model, prompts, [[4, 9, 2, 7, 7], [60, 3, 8, 1, 2], [11, 5, 7, 9, 40]], Q8_0)
    fused = batched_step(model, block_size=3, dtype=Q8_0)
    reference = without_fused(model, lambda m: batched_step(m, block_size=3, dtype=Q8_0))
    assert torch.abs(fused - reference).max() < 1e-3 * torch.abs(reference).max()


def test_ptuning_prefix_is_stored_as_q8_0(tmp_path):
    """A P-Tuning prefix goes into its pinned blocks as q8_0 blocks of its float values."""
    tiny_glm(head_dim=32).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    cfg = model.config
    model.prefix = torch.randn(cfg.num_layers, 2, 5, cfg.num_kv_heads, cfg.head_dim)
    cache = model.new_cache(2, 16, dtype=Q8_0, block_size=4)
    stored = cache.kv[:, :, :, cache.prefix].permute(0, 1, 3, 4, 2, 5).flatten(2, 3)[:, :, :5]  # [L, 2, P, H, W]
    assert torch.equal(stored, q8_0_bytes(model.prefix))


def test_q8_0_decode_stays_close_to_the_float16_cache(default_gguf):
    """The default model (SmolLM2-135M, head_dim 64), 24 tokens after a prompt (the float16 cache's greedy reply fed
    to every cache): q8_0's logits stay within twice the float16 cache's own distance from a float32 cache (measured
    1.5x: 4.1% against 2.8% of the logits' range), and q8_0 picks float16's greedy token wherever float16's top two
    are more than 1% of the range apart. A q8_0 value is off by up to half a code, 1/254 of its block's largest value
    (float16: 1/2048 of itself); the 8-bit rounding of activations before each product (llama.cpp's numerics) then
    amplifies both caches' rounding alike. A misplaced or misread block would be off by far more."""
    pipe = Pipeline(default_gguf)
    model = pipe.model
    prompt = pipe.tokenizer.encode("The capital of France is Paris. The capital of Italy is")

    def decode(kv_type, fed: list[int] | None = None) -> tuple[list[int], list[np.ndarray]]:
        cache = model.new_cache(1, 64, dtype=kv_type)
        slots = torch.zeros(1, dtype=torch.long)
        logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache, slots)[0, -1]
        tokens, steps = [], [logits.numpy()]
        for k in range(24):
            tokens.append(int(logits.argmax()) if fed is None else fed[k])
            logits = model(torch.tensor([[tokens[-1]]]), torch.tensor([[len(prompt) + k]]), cache, slots)[0, -1]
            steps.append(logits.numpy())
        return tokens, steps

    reply, half = decode(torch.float16)
    _, q8 = decode(Q8_0, reply)
    _, exact = decode(torch.float32, reply)

    def distance(steps: list[np.ndarray]) -> float:
        return max(np.abs(a - b).max() / (b.max() - b.min()) for a, b in zip(steps, half))

    assert distance(q8) < 2 * distance(exact) and distance(q8) < 0.1
    for a, b in zip(q8, half):
        first, second = np.sort(b)[-1:-3:-1]
        if first - second > 1e-2 * (b.max() - b.min()):
            assert a.argmax() == b.argmax()


def test_families_that_cannot_hold_q8_0_say_so(tmp_path):
    tiny_glm(head_dim=8).save_pretrained(tmp_path / "glm")
    with pytest.raises(KVTypeError, match="--kv-type q8_0 .* head_dim is 8, not a multiple of 32"):
        load_model(tmp_path / "glm", dtype="f32").new_cache(1, 16, dtype=Q8_0)
    flash = load_model(synthetic_gguf("glm4-moe-lite-tiny", "q4_0", tmp_path))
    with pytest.raises(KVTypeError, match=r"--kv-type q8_0 is not supported for GLM-4.7-Flash \(glm4_moe_lite\)"):
        flash.new_cache(1, 16, dtype=Q8_0)


def test_serve_stores_q8_0_blocks(default_gguf):
    """The server's engine takes the flag's cache type and replies over it."""
    pipe = Pipeline(default_gguf)
    app = create_app(pipe, max_batch=2, kv=KVSettings.from_flags("16M", 256, "q8_0"))
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"model": "m", "max_tokens": 8, "temperature": 0,
                                                      "messages": [{"role": "user", "content": "Name a colour."}]})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] > 0
        cache = app.state.server.engine.cache
        assert cache.kv_type == Q8_0 and cache.kv.dtype == torch.uint8 and "q8_0 in" in cache.describe()


@pytest.mark.parametrize("args, message", [  # SmolLM2-135M: 30 layers x 2 x 3 key heads x 16 rows x 68 bytes
    (["--kv-type", "q8_0", "--kv-memory", "1K"], r"^error: --kv-memory 1.0 KiB holds no KV block for a sequence: a "
                                                 r"block of 16 tokens takes 191.2 KiB for this model \(q8_0\)"),
    (["--kv-type", "q4_0"], r"argument --kv-type: invalid choice: 'q4_0' \(choose from '?auto'?, '?f32'?, '?f16'?, "
                            r"'?bf16'?, '?q8_0'?\)"),
])
def test_serve_flag_reaches_the_cache_or_names_the_choices(default_gguf, capsys, args, message):
    try:
        code = main(["serve", "-m", str(default_gguf), *args])
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    err = capsys.readouterr().err
    assert code in (1, 2) and re.search(message, err, re.M) and "Traceback" not in err


def test_flash_refusal_is_one_line_from_the_cli(tmp_path, capsys):
    path = synthetic_gguf("glm4-moe-lite-tiny", "q4_0", tmp_path)
    assert main(["serve", "-m", str(path), "--kv-type", "q8_0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --kv-type q8_0 is not supported for GLM-4.7-Flash") and err.count("\n") == 1


def test_perplexity_takes_q8_0(default_gguf, capsys):
    assert main(["perplexity", "-m", str(default_gguf), "-f", __file__, "--ctx", "32", "--chunks", "2",
                 "--kv-type", "q8_0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_type"] == "q8_0" and out["ppl"] > 1


def test_shared_prefixes_and_chunked_prompts_over_q8_0_blocks(tmp_path):
    """The batch engine over a q8_0 pool: prompts prefilled in chunks of 5 tokens (later chunks read earlier q8_0
    rows through the pages) and a second prompt taking the first one's full blocks give what one prompt alone,
    prefilled whole, gives over a q8_0 cache."""
    tiny_llama(layers=2, head_dim=32).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    model.kv_dtype = Q8_0  # the cache every helper below takes by default
    engine = BatchEngine(model, max_batch=2, block_size=4, prefill_chunk=5)
    try:
        head = [5, 17, 3, 44, 9, 61, 2, 8, 19, 23, 40]
        params = SamplingParams(do_sample=False, max_new_tokens=6)
        for tail in ([7, 12], [30, 31, 32]):
            request = engine.submit(head + tail, params)
            list(request)
            assert request.generated == list(generate(model, head + tail, params))
        assert engine.stats["reused_tokens"] >= 8 and engine.cache.kv_type == Q8_0
    finally:
        engine.close()


def test_chat_takes_the_flag(default_gguf, capsys, monkeypatch):
    """`chatglm chat --kv-type q8_0`: every cache the turn takes stores q8_0 blocks."""
    stored = []
    store = KVCache.store
    monkeypatch.setattr(KVCache, "store", lambda self, rows: stored.append(self.kv_type) or store(self, rows))
    assert main(["chat", "-m", str(default_gguf), "--kv-type", "q8_0", "-p", "Name a colour.", "--temp", "0",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() and stored and set(stored) == {Q8_0}


@needs_kernels
def test_glm_v1_fused_step_over_q8_0_blocks(tmp_path):
    """ChatGLM-6B's block (per-head q/k/v, 2D rotary, a P-Tuning prefix stored as q8_0 too), heads of 32 values:
    the C++ step's logits over q8_0 blocks equal torch's, to the bound and for the reason of the test above."""
    model = load_model(tiny_glm_v1(tmp_path, hidden=128, heads=4), dtype="f32")
    cfg = model.config
    assert cfg.head_dim == 32
    torch.manual_seed(1)
    model.prefix = torch.randn(cfg.num_layers, 2, 3, cfg.num_kv_heads, cfg.head_dim)
    to_blocks(model, QType.Q8_0)
    rng = np.random.default_rng(1)
    fused_and_torch_decode(model, GLM_V1_PROMPTS, [rng.integers(4, 20, 6).tolist() for _ in GLM_V1_PROMPTS], Q8_0)
