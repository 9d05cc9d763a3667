"""Where loading a model file goes: import, open (header, tensor table, config), tokenizer, and the
finite check over every tensor, each as [wall s, CPU s]; or, with --pipeline, the whole `Pipeline(path)`.

Usage: .venv/bin/python bench/load_time.py [PATH] [--pipeline]   (PATH defaults to the default model)
Prints one JSON line. Each run is a fresh process, so nothing of the file is mapped yet.
"""
from __future__ import annotations

import json
import sys
import time


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> list[float]:
    wall, cpu = clock()
    return [round(wall - start[0], 3), round(cpu - start[1], 3)]


def main() -> None:
    start = clock()
    from chatglm import Pipeline
    from chatglm.loaders import finite_checked, open_checkpoint, resolve_path

    out = {"import": since(start)}
    args = [a for a in sys.argv[1:] if a != "--pipeline"]
    path = resolve_path(args[0] if args else "default")
    start = clock()
    if "--pipeline" in sys.argv:
        Pipeline(path)
        print(json.dumps({"file": path.name, **out, "pipeline": since(start)}))
        return
    ckpt = open_checkpoint(path)
    out["open"] = since(start)
    start = clock()
    ckpt.load_tokenizer()
    out["tokenizer"] = since(start)
    get = finite_checked(ckpt.get, ckpt.path)
    start = clock()
    for names in ckpt.layout.values():
        for name in names:
            get(name)
    out["finite"] = since(start)
    print(json.dumps({"file": path.name, **out}))


if __name__ == "__main__":
    main()
