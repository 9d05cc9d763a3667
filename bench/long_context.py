"""Attention at a long context, alone, beside its peer in the same process (alternating, process CPU time, the
lowest of several repeats: wall time on a shared CPU swings too much).

decode: the C++ step (decode_step.cpp) over 28 layers of the 6B attention shape (32 query heads, 2 key heads of
128) with a 64-wide hidden state, so its linears cost nothing and the step is its attention, against torch's
grouped SDPA over the same pages gathered per layer (the torch step's attention). With --kv-type q8_0 the same
step over an f16 cache of the same values runs alternating with it (cpp_step_f16_ms): what reading 53% of the
bytes and decoding the blocks costs or saves.
prefill: one layer's attention for a T-token prompt: torch's causal kernel (what a fresh prompt takes now)
against the mask with grouped keys (what it took before).

Usage: .venv/bin/python bench/long_context.py [--context 3000] [--threads 2] [--kv-type f16|f32|q8_0]
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from chatglm.kernels.ggml import _ggml
from chatglm.kv_cache import KV_TYPES, KVType
from chatglm.quant import QType, q8_0_bytes, q8_0_values, quantize

HEADS, KV_HEADS, HEAD_DIM, LAYERS, BLOCK = 32, 2, 128, 28, 16
HIDDEN = FFN = 64


def cpu_ms(fn: Callable[[], object], repeats: int) -> float:
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats * 1e3


def lowest(pairs: dict[str, Callable[[], object]], rounds: int, repeats: int) -> dict[str, float]:
    """Each function's lowest time over `rounds` rounds, the functions alternating within a round."""
    times: dict[str, list[float]] = {name: [] for name in pairs}
    for _ in range(rounds):
        for name, fn in pairs.items():
            times[name].append(cpu_ms(fn, repeats))
    return {name: round(min(t), 2) for name, t in times.items()}


def blocks(rows: int, cols: int) -> list[torch.Tensor]:
    return [torch.from_numpy(quantize((torch.randn(rows, cols) * 0.1).numpy(), QType.Q4_0))]


def decode(context: int, kv_type: KVType, rounds: int) -> dict[str, float]:
    q4 = int(QType.Q4_0)
    layers = [_ggml.DecodeLayer(torch.ones(HIDDEN), torch.ones(HIDDEN), blocks((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
                                q4, None, blocks(HIDDEN, HEADS * HEAD_DIM), q4, None, HEADS * HEAD_DIM,
                                blocks(2 * FFN, HIDDEN), q4, blocks(HIDDEN, FFN), q4, FFN) for _ in range(LAYERS)]
    step = _ggml.FusedDecoder(layers, HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM // 2, False, 1e-5, 4)
    rope = torch.randn(context + 1, HEAD_DIM // 4, 2)
    n = context // BLOCK + 2
    rows = torch.randn(LAYERS, 2, KV_HEADS, n, BLOCK, HEAD_DIM) * 0.5
    quantized = isinstance(kv_type, QType)
    kv = q8_0_bytes(rows) if quantized else rows.to(kv_type)
    tables = torch.arange(1, n)[None].contiguous()
    x, at = torch.randn(1, HIDDEN), torch.tensor([context])
    q = torch.randn(1, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)

    def torch_attention() -> None:
        for layer in range(LAYERS):
            keys, values = kv[layer][:, :, tables].transpose(1, 2).flatten(3, 4)[..., : context + 1, :]
            if quantized:
                keys, values = q8_0_values(keys), q8_0_values(values)
            F.scaled_dot_product_attention(q, keys.float(), values.float())

    pairs = {"cpp_step_ms": lambda: step.step(x.clone(), kv, tables, at, at, rope), "torch_sdpa_ms": torch_attention}
    if quantized:
        half = rows.half()
        pairs["cpp_step_f16_ms"] = lambda: step.step(x.clone(), half, tables, at, at, rope)
    return lowest(pairs, rounds, 3)


def prefill(context: int, rounds: int) -> dict[str, float]:
    q = torch.randn(1, HEADS, context, HEAD_DIM)
    k, v = torch.randn(2, 1, KV_HEADS, context, HEAD_DIM)
    mask = torch.ones(context, context, dtype=torch.bool).tril()[None, None]
    return lowest({"causal_layer_ms": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                   "masked_layer_ms": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)},
                  rounds, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-type", choices=["f32", "f16", "q8_0"], default="f16")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    if _ggml is None:
        raise SystemExit("the C++ kernels are not built: run `.venv/bin/python setup.py build_ext --inplace`")
    torch.set_num_threads(args.threads)
    print(json.dumps({"context": args.context, "threads": args.threads, "kv_type": args.kv_type,
                      "decode_28_layers": decode(args.context, KV_TYPES[args.kv_type], args.rounds),
                      "prefill_one_layer": prefill(args.context, max(2, args.rounds // 2))}))


if __name__ == "__main__":
    main()
