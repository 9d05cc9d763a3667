"""`chatglm bench`: load time, prefill and decode speed, peak memory; optionally llama.cpp on the
same file in the same run, the two alternating round by round, so a speed is always read as a ratio against a
peer measured beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .cli import kv_type_flag, mmap_flag
from .kv_cache import KV_TYPES, RESERVE, available_memory, kv_type_name
from .quant import QType


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(vocab: int, n: int) -> list[int]:
    """A fixed pseudo-random prompt: speed does not depend on the words, only on their count."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, max(101, min(vocab, 30000)), (n,), generator=g).tolist()


class Ours:
    """Our model and cache on one file, timed a round at a time: a prompt's prefill, then decode from its end."""

    engine = "chatglm"

    def __init__(self, path: str, device: str, dtype: str, prompt_tokens: int, new_tokens: int, batch: int,
                 kv_type: str = "auto", use_mmap: bool | None = None) -> None:
        from .loaders import build_model, mmap_option, open_checkpoint
        from .loaders.huge_pages import settle

        start = time.perf_counter()
        use_mmap = mmap_option(use_mmap, device)
        checkpoint = open_checkpoint(path, use_mmap=use_mmap)
        self.model = model = build_model(checkpoint, dtype, device)
        load_s = time.perf_counter() - start
        settle()  # moving into huge pages: decode is timed once the weights sit still
        moved_s = time.perf_counter() - start - load_s
        self.ids = prompt_ids(model.config.vocab_size, prompt_tokens)
        self.batch, self.new_tokens = batch, new_tokens
        self.cache = model.new_cache(batch, prompt_tokens + new_tokens + 1, dtype=KV_TYPES.get(kv_type))
        self.slots = torch.arange(batch, device=model.device)
        self.sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
        self.info = {"load_s": round(load_s, 3), "batch": batch, "prompt_tokens": prompt_tokens,
                     "new_tokens": new_tokens, "threads": torch.get_num_threads(),
                     "fused_step": getattr(model, "fused", None) is not None,  # decode ran as one C++ call per token
                     "kv_type": kv_type_name(self.cache.kv_type), "kv_bytes_per_token": self.cache.token_bytes(),
                     "weights": checkpoint.placement, "use_mmap": use_mmap,
                     **({} if use_mmap else {"weights_moved_s": round(moved_s, 3)})}

    def prefill(self) -> float:
        t = time.perf_counter()
        n = len(self.ids)
        tokens = torch.tensor([self.ids] * self.batch, device=self.model.device)
        pos = torch.arange(n, device=self.model.device).expand(self.batch, -1)
        self.model(tokens, pos, self.cache, self.slots, last_only=True)
        self.sync()
        return time.perf_counter() - t

    def decode(self, steps: int) -> float:
        token = torch.full((self.batch, 1), self.ids[-1], device=self.model.device)
        t = time.perf_counter()
        for step in range(steps):
            self.model(token, torch.full((self.batch, 1), len(self.ids) + step, device=self.model.device), self.cache,
                       self.slots)
        self.sync()
        return time.perf_counter() - t

    def memory(self) -> dict[str, float]:
        """Peak memory so far: measured before llama.cpp loads into the same process."""
        out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
        if self.model.device.type == "cuda":
            out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out


class LlamaCpp:
    """llama.cpp (llama-cpp-python) on the same file, timed as `Ours`: its cache stored as ours (`kv_type`; q8_0
    values need its flash attention), or its default (f16) for auto; use_mmap=False is llama.cpp's --no-mmap (the
    file read into allocated memory)."""

    engine = "llama.cpp"

    def __init__(self, path: str, threads: int, prompt_tokens: int, new_tokens: int, kv_type: str = "auto",
                 use_mmap: bool = True) -> None:
        import llama_cpp

        cache = {}
        if kv_type != "auto":  # ggml's type id, as its -ctk / -ctv take it
            ggml_type = int(QType[kv_type.upper()])
            cache = dict(type_k=ggml_type, type_v=ggml_type, flash_attn=kv_type == "q8_0")
        start = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=prompt_tokens + new_tokens + 8, n_threads=threads,
                                   n_threads_batch=threads, n_batch=max(prompt_tokens, 8), use_mmap=use_mmap,
                                   verbose=False, **cache)
        self.ids = prompt_ids(self.llm.n_vocab(), prompt_tokens)
        self.info = {"load_s": round(time.perf_counter() - start, 3), "use_mmap": use_mmap}

    def prefill(self) -> float:
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(self.ids)
        return time.perf_counter() - t

    def decode(self, steps: int) -> float:
        self.llm.n_tokens = len(self.ids)  # from the prompt's end, as ours: eval drops the cache past n_tokens
        t = time.perf_counter()
        for _ in range(steps):
            self.llm.eval([self.ids[-1]])
        return time.perf_counter() - t


def warmed(engine):
    """The engine after one untimed prefill and two decode steps (first calls allocate and pick kernels)."""
    engine.prefill()
    engine.decode(2)
    return engine


def timed_rounds(engines: list, rounds: int, new_tokens: int) -> list[dict[str, list[float]]]:
    """Each engine's prefill and decode seconds over `rounds` rounds, the engines alternating within a round and
    taking turns going first: on a shared machine the memory bus swings by 20-30% from one second to the next, so
    only neighbouring times compare."""
    times: list[dict[str, list[float]]] = [{"prefill": [], "decode": []} for _ in engines]
    for r in range(rounds):
        for i in range(len(engines)) if r % 2 == 0 else reversed(range(len(engines))):
            times[i]["prefill"].append(engines[i].prefill())
            times[i]["decode"].append(engines[i].decode(new_tokens))
    return times


def speeds(times: dict[str, list[float]], tokens: int, new_tokens: int) -> dict[str, float]:
    """Median prefill and decode tok/s over the rounds."""
    return {"prefill_tok_s": round(tokens / statistics.median(times["prefill"]), 2),
            "decode_tok_s": round(new_tokens / statistics.median(times["decode"]), 2)}


def ratio(ours: list[float], peer: list[float], alternated: bool) -> float:
    """Our speed over the peer's: the median of the rounds' ratios when they alternated (each against its
    neighbour), else the ratio of the medians."""
    if alternated:
        return round(statistics.median(p / o for o, p in zip(ours, peer)), 3)
    return round(statistics.median(peer) / statistics.median(ours), 3)


def fits_beside(path: str) -> bool:
    """Whether llama.cpp's copy of the file can be loaded beside ours (each holds about the file) with room to
    spare, so the two can alternate."""
    return 2 * os.path.getsize(path) + RESERVE <= available_memory()


class CountedDrafter:
    """Counts what a drafter proposes: one call per target forward, so accepted = tokens - 1 - calls."""

    def __init__(self, drafter):
        self.drafter, self.calls, self.drafted = drafter, 0, 0

    def draft(self, history, limit: int) -> list[int]:
        out = self.drafter.draft(history, limit)
        self.calls += 1
        self.drafted += len(out)
        return out


def timed_decode(tokens) -> tuple[list[int], float]:
    """Run a token generator to its end: the tokens, and the seconds from the first token to the last."""
    out, start = [], 0.0
    for token in tokens:
        if not out:
            start = time.perf_counter()
        out.append(token)
    return out, time.perf_counter() - start


def bench_speculative(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy replies to a real prompt, plain and with drafts, alternating: decode tok/s, the speed-up, the
    share of drafted tokens accepted; the replies must be equal (speculation changes speed, never text)."""
    from .engine import SamplingParams, generate
    from .loaders.huge_pages import settle
    from .pipeline import Pipeline
    from .speculative import PromptLookup, open_draft

    pipe = Pipeline(args.model, dtype=args.dtype, device=args.device, use_mmap=args.use_mmap)
    settle()  # the weights sit still before anything is timed
    text = Path(args.prompt_file).read_text(encoding="utf-8")
    prompt, _ = pipe.chat_prompt([{"role": "user", "content": text}])
    if args.draft:
        drafter = open_draft(args.draft, pipe.path, pipe.tokenizer, len(prompt) + args.new_tokens + 1, args.dtype,
                             args.device)
    else:
        drafter = PromptLookup(args.lookup or 10)
    params = SamplingParams(do_sample=False, max_new_tokens=args.new_tokens)
    runs: dict[str, list[float]] = {"plain": [], "speculative": []}
    replies, acceptance = {}, []
    for _ in range(args.rounds + 1):  # the first round warms up and is not counted
        for name in runs:
            counted = CountedDrafter(drafter) if name == "speculative" else None
            reply, seconds = timed_decode(generate(pipe.model, prompt, params, pipe.stop_ids,
                                                   pipe.tokenizer.vocab_size, drafter=counted))
            replies[name] = reply
            runs[name].append((len(reply) - 1) / seconds if seconds else 0.0)
            if counted is not None and counted.drafted:
                acceptance.append((len(reply) - 1 - counted.calls) / counted.drafted)
    if replies["plain"] != replies["speculative"]:
        raise RuntimeError("speculative decoding changed the greedy reply: a bug, please report it")
    plain, spec = (statistics.median(v[1:]) for v in runs.values())  # the first round warmed up
    out = {"engine": "chatglm", "prompt_file": args.prompt_file, "prompt_tokens": len(prompt),
           "new_tokens": len(replies["plain"]), "drafter": f"draft {args.draft}" if args.draft else
           f"lookup {drafter.tokens}", "plain_tok_s": round(plain, 2), "speculative_tok_s": round(spec, 2),
           "speedup": round(spec / plain, 3), "acceptance": round(sum(acceptance) / len(acceptance), 3)
           if acceptance else None, "threads": torch.get_num_threads()}
    if args.compare == "llama.cpp":
        from .loaders import resolve_path

        if args.draft:
            raise ValueError("--compare llama.cpp with --prompt-file measures prompt lookup (--lookup), not --draft")
        out["llama_cpp"] = bench_llama_cpp_lookup(str(resolve_path(pipe.path)), torch.get_num_threads(), prompt,
                                                  args.new_tokens, args.lookup or 10, args.rounds, peer_mmap(args))
    return out


def peer_mmap(args: argparse.Namespace) -> bool:
    """llama.cpp's use_mmap beside ours: the --mmap / --no-mmap given, else its own default (mapped)."""
    return True if args.use_mmap is None else args.use_mmap


def bench_llama_cpp_lookup(path: str, threads: int, prompt: list[int], new_tokens: int, lookup: int,
                           rounds: int, use_mmap: bool = True) -> dict[str, Any]:
    """llama-cpp-python greedy on the same prompt ids, plain and with LlamaPromptLookupDecoding, alternating."""
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    # logits_all=True with the draft: otherwise its score rows are sized by n_batch, too few (llama-cpp-python 0.3)
    engines = {name: llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + new_tokens + lookup + 8, n_threads=threads,
                                     n_threads_batch=threads, n_batch=max(len(prompt), 8), use_mmap=use_mmap,
                                     verbose=False, logits_all=name == "speculative",
                                     draft_model=LlamaPromptLookupDecoding(num_pred_tokens=lookup)
                                     if name == "speculative" else None)
               for name in ("plain", "speculative")}
    runs: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds + 1):
        for name, llm in engines.items():
            llm.reset()
            tokens = llm.generate(prompt, temp=0.0, top_k=1, reset=True)
            reply, seconds = timed_decode(_until_eos(tokens, llm.token_eos(), new_tokens))
            runs[name].append((len(reply) - 1) / seconds if seconds else 0.0)
    plain, spec = (statistics.median(v[1:]) for v in runs.values())  # the first round warmed up
    return {"engine": "llama-cpp-python", "plain_tok_s": round(plain, 2), "speculative_tok_s": round(spec, 2),
            "speedup": round(spec / plain, 3), "lookup": lookup}


def _until_eos(tokens, eos: int, limit: int):
    for _, token in zip(range(limit), tokens):
        if token == eos:
            return
        yield token


@contextmanager
def busy_core(on: bool) -> Iterator[Callable[[], float]]:
    """A CPU-bound process pinned to core 0 beside everything inside (`--busy`): a user's machine where another
    program holds a core, the same for every engine measured in the run. Gives the CPU seconds it has spun so far
    (0.0 when off), which shows that it ran."""
    if not on:
        yield lambda: 0.0
        return
    spin = subprocess.Popen([sys.executable, "-c", "import os\nos.sched_setaffinity(0, {0})\nwhile True: pass"])
    stat = Path(f"/proc/{spin.pid}/stat")
    try:  # utime and stime: fields 14 and 15, after the parenthesized command name
        yield lambda: sum(map(int, stat.read_text().rsplit(")", 1)[1].split()[11:13])) / os.sysconf("SC_CLK_TCK")
    finally:
        spin.kill()
        spin.wait()


def cmd_bench(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    with busy_core(args.busy) as busy_seconds:
        args.busy_seconds = busy_seconds
        return _bench(args)


def _bench(args: argparse.Namespace) -> int:
    if args.prompt_file:
        return print_speculative(bench_speculative(args), args.json)
    path = args.model
    if args.synthetic:
        from .synthetic import synthetic_file

        path = str(synthetic_file(args.synthetic, args.qtype, Path(args.synthetic_dir), args.synthetic_layers))
    if args.compare == "llama.cpp":
        if str(path).endswith(".bin"):
            raise ValueError(f"--compare llama.cpp: llama.cpp cannot read {path} (chatglm.cpp's GGML format); "
                             "measure chatglm.cpp on it instead")
        if args.batch != 1:
            raise ValueError("--compare llama.cpp measures batch 1 only")
    if args.rounds < 1:
        raise ValueError(f"--rounds {args.rounds}: expected at least 1")
    threads, n, new = torch.get_num_threads(), args.prompt_tokens, args.new_tokens
    peer_args = (n, new, args.kv_type, peer_mmap(args))
    if args.compare == "llama.cpp":
        from .loaders import resolve_path

        peer_path = str(resolve_path(path))
        alternated = fits_beside(peer_path)
    ours = warmed(Ours(path, args.device, args.dtype, n, new, args.batch, args.kv_type, args.use_mmap))
    result: dict[str, Any] = {"model": str(path), "engine": "chatglm", **ours.info, **ours.memory(),
                              "rounds": args.rounds}
    engines = [ours]
    if args.compare == "llama.cpp" and alternated:
        engines.append(warmed(LlamaCpp(peer_path, threads, *peer_args)))
    times = timed_rounds(engines, args.rounds, new)
    result.update(speeds(times[0], args.batch * n, args.batch * new))
    if args.compare == "llama.cpp":
        if not alternated:  # one at a time: ours goes before llama.cpp's copy is read
            print(f"{peer_path}: two copies do not fit in memory, so llama.cpp runs after ours, not alternating",
                  file=sys.stderr)
            del engines, ours
            engines = [warmed(LlamaCpp(peer_path, threads, *peer_args))]
            times += timed_rounds(engines, args.rounds, new)
        peer = engines[-1]
        result["llama_cpp"] = {"engine": "llama.cpp", **peer.info, **speeds(times[-1], n, new)}
        result["alternated"] = alternated
        result["decode_ratio"] = ratio(times[0]["decode"], times[-1]["decode"], alternated)
        result["prefill_ratio"] = ratio(times[0]["prefill"], times[-1]["prefill"], alternated)
    result["busy_core_cpu_s"] = round(args.busy_seconds(), 2)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"model {result['model']}  threads {threads}  batch {args.batch}  median of {args.rounds} rounds"
              + ("  (a CPU-bound process on core 0)" if args.busy else ""))
        print(f"chatglm    load {result['load_s']:.2f} s  prefill {result['prefill_tok_s']:.1f} tok/s  "
              f"decode {result['decode_tok_s']:.1f} tok/s  peak RSS {result['peak_rss_mb']:.0f} MB  "
              f"KV {result['kv_type']} {result['kv_bytes_per_token']} B/token")
        if result["weights"]:
            moved = f", all moved {result['weights_moved_s']:.2f} s after load" if "weights_moved_s" in result else ""
            print(f"           {result['weights']}{moved}")
        if "llama_cpp" in result:
            p = result["llama_cpp"]
            print(f"llama.cpp  load {p['load_s']:.2f} s  prefill {p['prefill_tok_s']:.1f} tok/s  "
                  f"decode {p['decode_tok_s']:.1f} tok/s")
            how = "each round against its neighbour" if alternated else "one after the other"
            print(f"ratio      prefill {result['prefill_ratio']:.2f}x  decode {result['decode_ratio']:.2f}x  ({how})")
    return 0


def print_speculative(result: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(result))
        return 0
    print(f"{result['prompt_file']}: {result['prompt_tokens']} prompt tokens, {result['new_tokens']} new, greedy, "
          f"threads {result['threads']}, {result['drafter']}")
    print(f"chatglm           plain {result['plain_tok_s']:.1f} tok/s  speculative {result['speculative_tok_s']:.1f} "
          f"tok/s  {result['speedup']:.2f}x  acceptance {result['acceptance']}")
    if "llama_cpp" in result:
        p = result["llama_cpp"]
        print(f"llama-cpp-python  plain {p['plain_tok_s']:.1f} tok/s  speculative {p['speculative_tok_s']:.1f} "
              f"tok/s  {p['speedup']:.2f}x (LlamaPromptLookupDecoding, {p['lookup']} tokens)")
        print(f"ratio             speculative {result['speculative_tok_s'] / p['speculative_tok_s']:.2f}x")
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
    kv_type_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--busy", action="store_true",
                   help="run a CPU-bound process pinned to core 0 beside every engine measured (a busy machine)")
    p.add_argument("--compare", choices=["llama.cpp"], default=None,
                   help="run llama.cpp on the same file too (with the --mmap / --no-mmap given, else its own default)")
    mmap_flag(p)
    p.add_argument("--synthetic", default=None,
                   help="build a random-weight GGUF of this shape (chatglm3-6b, glm4-9b, glm4-9b-0414, glm-4.5-air, "
                        "glm-4.7-flash), or a chatglm.cpp GGML .bin (chatglm-6b)")
    p.add_argument("--qtype", default="q4_0", help="quant type of the synthetic file")
    p.add_argument("--synthetic-layers", "--layers", dest="synthetic_layers", type=int, default=None,
                   help="the synthetic shape's widths with this many layers (per-layer speed from a small file)")
    p.add_argument("--synthetic-dir", default=str(Path.home() / ".cache" / "chatglm"), help="where synthetic files go")
    p.add_argument("--prompt-file", default=None, metavar="F",
                   help="speculative decoding on this real prompt (a user message): decode tok/s plain and with "
                        "drafts, alternating, and the share of drafts accepted; --compare llama.cpp adds "
                        "llama-cpp-python's prompt-lookup decoding")
    p.add_argument("--lookup", type=int, default=0, metavar="N", help="with --prompt-file: drafts of N tokens (10)")
    p.add_argument("--draft", default=None, metavar="MODEL", help="with --prompt-file: a draft model instead")
    p.add_argument("--rounds", type=int, default=3,
                   help="measured rounds of each engine, alternating with --compare (median); with --prompt-file, "
                        "of plain and speculative decoding")
    p.set_defaults(func=cmd_bench)

