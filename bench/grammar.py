"""Grammar engines on our own vocabularies, and the cost of the token mask in a default-model decode step.

1. llguidance and xgrammar (when importable) on ChatGLM3's SentencePiece, GLM-4's tiktoken and the default GGUF's
   BPE: time to read the vocabulary, to compile one nested JSON schema, and per token along a valid reply (mask,
   unpacked to one bool per id, plus advancing the state).
2. The default model through the batch engine, 4 sequences: decode steps with and without a json_schema mask
   on every sequence (the plain run repeats the masked run's lengths, so both take the same steps with the same
   batch sizes), process CPU ms per step (lowest of 5) and their ratio.

Usage: .venv/bin/python bench/grammar.py [--threads 2] [--tokens 48]
Prints one JSON line per measurement. Needs ../shared/tokenizers for the GLM vocabularies.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy
import torch

from chatglm import Pipeline
from chatglm.default_model import default_model_path
from chatglm.engine import BatchEngine, SamplingParams
from chatglm.grammar import Vocabulary, json_grammar
from chatglm.tokenizers import load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pets"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "pets": {"type": "array", "items": {"type": "object", "required": ["kind", "legs"],
                                                            "properties": {"kind": {"type": "string"},
                                                                           "legs": {"type": "integer"}}}}}}
REPLY = '{"name": "Ann Smith", "age": 31, "pets": [{"kind": "cat", "legs": 4}, {"kind": "dog", "legs": 3}]}'


def llguidance_run(tokenizer, ids: list[int]) -> dict:
    start = time.perf_counter()
    vocab = Vocabulary(tokenizer, tokenizer.eos_ids)
    read = time.perf_counter()
    grammar = json_grammar("llama", SCHEMA)  # no metadata line: the same bytes for every vocabulary
    mask = vocab.mask(grammar)
    logits = torch.randn(tokenizer.vocab_size)
    compiled = time.perf_counter()
    for i in ids:  # the Sampler's mask stage: mask, fill, advance
        assert mask.apply(logits)[i] == logits[i]
        mask.accept(i)
    end = time.perf_counter()
    return {"vocab_s": read - start, "compile_ms": 1e3 * (compiled - read),
            "per_token_ms": 1e3 * (end - compiled) / len(ids)}


def xgrammar_run(tokenizer, ids: list[int]) -> dict:
    import xgrammar

    start = time.perf_counter()
    info = xgrammar.TokenizerInfo([tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)],
                                  xgrammar.VocabType.RAW, vocab_size=tokenizer.vocab_size,
                                  stop_token_ids=sorted(tokenizer.eos_ids))
    compiler = xgrammar.GrammarCompiler(info)
    read = time.perf_counter()
    matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False))
    compiled = time.perf_counter()
    bitmask = xgrammar.allocate_token_bitmask(1, tokenizer.vocab_size)
    logits = torch.randn(tokenizer.vocab_size).numpy()
    for i in ids:  # the same stage as ours: mask, unpack, fill, advance
        matcher.fill_next_token_bitmask(bitmask)
        flags = numpy.unpackbits(bitmask.numpy().view(numpy.uint8), bitorder="little").view(bool)[: logits.size]
        assert numpy.where(flags, logits, numpy.float32(-numpy.inf))[i] == logits[i]
        assert matcher.accept_token(i)
    end = time.perf_counter()
    return {"vocab_s": read - start, "compile_ms": 1e3 * (compiled - read),
            "per_token_ms": 1e3 * (end - compiled) / len(ids)}


def engines(args) -> None:
    from chatglm.loaders import open_checkpoint

    vocabularies = {"chatglm3 (SentencePiece)": lambda: load_tokenizer(SHARED / "chatglm3-6b"),
                    "glm4 (tiktoken)": lambda: load_tokenizer(SHARED / "glm-4-9b"),
                    "default GGUF (BPE)": lambda: open_checkpoint(default_model_path()).load_tokenizer()}
    for name, load in vocabularies.items():
        try:
            tokenizer = load()
        except (OSError, ValueError) as e:
            print(json.dumps({"vocabulary": name, "skipped": str(e)}))
            continue
        ids = [i for i in tokenizer.encode(REPLY) if tokenizer.token_bytes(i)]
        if b"".join(tokenizer.token_bytes(i) for i in ids) != REPLY.encode():  # SentencePiece's leading space
            ids = Vocabulary(tokenizer, tokenizer.eos_ids).ll.greedy_tokenize(REPLY)
        for engine, run in (("llguidance", llguidance_run), ("xgrammar", xgrammar_run)):
            try:
                result = run(tokenizer, ids)
            except ImportError as e:
                result = {"skipped": str(e)}
            print(json.dumps({"vocabulary": name, "vocab_size": tokenizer.vocab_size, "engine": engine,
                              "tokens": len(ids), **result}))


def decode_cost(args) -> None:
    pipe = Pipeline("default")
    engine = BatchEngine(pipe.model, max_batch=4)
    prompt = pipe.tokenizer.encode_chat([{"role": "user", "content": "Describe a person as JSON."}])
    grammar = json_grammar(pipe.tokenizer.family, SCHEMA)
    pipe.vocabulary.check(grammar, "bench")

    def run(lengths: list[int] | None) -> tuple[float, list[int]]:
        """Masked (lengths None) or plain with the masked run's lengths: the same steps, the same batch sizes."""
        params = [SamplingParams(do_sample=True, temperature=1.0, top_p=1.0, seed=k,
                                 max_new_tokens=args.tokens if lengths is None else lengths[k]) for k in range(4)]
        masks = [pipe.vocabulary.mask(grammar) for _ in params] if lengths is None else []
        stops = pipe.stop_ids if lengths is None else frozenset()
        requests = engine.submit_group(prompt, params, stops, pipe.tokenizer.vocab_size, masks)
        requests[0].tokens.get()  # the prefill is done: time the decode steps only
        start = time.process_time()  # CPU time of the whole process (the engine's thread too): load-proof
        for r in requests:
            list(r)
        steps = [len(r.generated) + (r.finish_reason == "stop") for r in requests]
        return time.process_time() - start, steps

    run(None)  # warm up
    masked_s, plain_s, steps = [], [], 0
    for _ in range(5):
        seconds, lengths = run(None)
        masked_s.append(seconds)
        plain_s.append(run(lengths)[0])
        steps = max(lengths) - 1
    plain, masked = min(plain_s) / steps, min(masked_s) / steps
    engine.close()
    print(json.dumps({"bench": "decode step, 4 sequences, default model", "plain_ms": round(1e3 * plain, 3),
                      "json_schema_ms": round(1e3 * masked, 3), "ratio": round(masked / plain, 3)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engines(args)
    decode_cost(args)


if __name__ == "__main__":
    main()
