"""`chatglm bench`: load time, prefill and decode speed, peak memory; optionally llama.cpp on the
same file in the same run, so a speed is always read as a ratio against a peer measured beside it.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from .kv_cache import KV_TYPES


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(vocab: int, n: int) -> list[int]:
    """A fixed pseudo-random prompt: speed does not depend on the words, only on their count."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, max(101, min(vocab, 30000)), (n,), generator=g).tolist()


def bench_ours(path: str, device: str, dtype: str, prompt_tokens: int, new_tokens: int, batch: int,
               kv_type: str = "auto") -> dict[str, Any]:
    from .loaders import load_model

    start = time.perf_counter()
    model = load_model(path, dtype=dtype, device=device)
    load_s = time.perf_counter() - start
    ids = prompt_ids(model.config.vocab_size, prompt_tokens)
    cache = model.new_cache(batch, prompt_tokens + new_tokens + 1, dtype=KV_TYPES.get(kv_type))
    slots = torch.arange(batch, device=model.device)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    def prefill() -> float:
        t = time.perf_counter()
        tokens = torch.tensor([ids] * batch, device=model.device)
        pos = torch.arange(prompt_tokens, device=model.device).expand(batch, -1)
        model(tokens, pos, cache, slots, last_only=True)
        sync()
        return time.perf_counter() - t

    prefill()  # warm-up: first calls allocate and pick kernels
    prefill_s = prefill()
    token = torch.full((batch, 1), ids[-1], device=model.device)
    for step in range(2):  # warm-up decode steps
        model(token, torch.full((batch, 1), prompt_tokens + step, device=model.device), cache, slots)
    sync()
    t = time.perf_counter()
    for step in range(new_tokens):
        model(token, torch.full((batch, 1), prompt_tokens + step, device=model.device), cache, slots)
    sync()
    decode_s = time.perf_counter() - t
    out = {"engine": "chatglm", "load_s": round(load_s, 3), "prefill_tok_s": round(batch * prompt_tokens / prefill_s, 2),
           "decode_tok_s": round(batch * new_tokens / decode_s, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
           "batch": batch, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "threads": torch.get_num_threads(),
           "kv_type": str(cache.kv.dtype).removeprefix("torch."), "kv_bytes_per_token": cache.token_bytes()}
    if model.device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def bench_llama_cpp(path: str, threads: int, prompt_tokens: int, new_tokens: int) -> dict[str, Any]:
    """llama.cpp (llama-cpp-python) on the same file: prompt eval, then token-by-token eval."""
    import llama_cpp

    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=prompt_tokens + new_tokens + 8, n_threads=threads,
                          n_threads_batch=threads, n_batch=max(prompt_tokens, 8), verbose=False)
    load_s = time.perf_counter() - start
    ids = prompt_ids(llm.n_vocab(), prompt_tokens)
    llm.eval(ids)  # warm-up
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([ids[-1]])
    decode_s = time.perf_counter() - t
    return {"engine": "llama.cpp", "load_s": round(load_s, 3), "prefill_tok_s": round(prompt_tokens / prefill_s, 2),
            "decode_tok_s": round(new_tokens / decode_s, 2)}


def cmd_bench(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model
    if args.synthetic:
        from .synthetic import synthetic_gguf

        path = str(synthetic_gguf(args.synthetic, args.qtype, Path(args.synthetic_dir), args.layers))
    ours = bench_ours(path, args.device, args.dtype, args.prompt_tokens, args.new_tokens, args.batch, args.kv_type)
    result: dict[str, Any] = {"model": str(path), **ours}
    if args.compare == "llama.cpp":
        if args.batch != 1:
            raise ValueError("--compare llama.cpp measures batch 1 only")
        from .loaders import resolve_path

        peer = bench_llama_cpp(str(resolve_path(path)), torch.get_num_threads(), args.prompt_tokens, args.new_tokens)
        result["llama_cpp"] = peer
        result["decode_ratio"] = round(ours["decode_tok_s"] / peer["decode_tok_s"], 3)
        result["prefill_ratio"] = round(ours["prefill_tok_s"] / peer["prefill_tok_s"], 3)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"model {result['model']}  threads {ours['threads']}  batch {ours['batch']}")
        print(f"chatglm    load {ours['load_s']:.2f} s  prefill {ours['prefill_tok_s']:.1f} tok/s  "
              f"decode {ours['decode_tok_s']:.1f} tok/s  peak RSS {ours['peak_rss_mb']:.0f} MB  "
              f"KV {ours['kv_type']} {ours['kv_bytes_per_token']} B/token")
        if "llama_cpp" in result:
            p = result["llama_cpp"]
            print(f"llama.cpp  load {p['load_s']:.2f} s  prefill {p['prefill_tok_s']:.1f} tok/s  "
                  f"decode {p['decode_tok_s']:.1f} tok/s")
            print(f"ratio      prefill {result['prefill_ratio']:.2f}x  decode {result['decode_ratio']:.2f}x")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure load, prefill and decode speed")
    p.add_argument("-m", "--model", default="default")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--kv-type", choices=["auto", *KV_TYPES], default="auto",
                   help="KV cache storage (auto: f16 for ggml block files, as llama.cpp keeps its cache)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--compare", choices=["llama.cpp"], default=None, help="run llama.cpp on the same file too")
    p.add_argument("--synthetic", default=None,
                   help="build a random-weight GGUF of this shape (chatglm3-6b, glm4-9b, glm4-9b-0414, glm-4.7-flash)")
    p.add_argument("--qtype", default="q4_0", help="quant type of the synthetic file")
    p.add_argument("--layers", type=int, default=None,
                   help="the synthetic shape with this many layers (same widths: a small file to develop on)")
    p.add_argument("--synthetic-dir", default=str(Path.home() / ".cache" / "chatglm"), help="where synthetic files go")
    p.set_defaults(func=cmd_bench)

