"""Fuzz the loaders: thousands of seeded mutants of small valid GGUF, GGML and safetensors files.

Every mutant must either load (and, when fully built, give finite logits) or raise one ModelFileError
naming the file; any other exception, a non-finite logit or a slow load is collected as a failure
and reported with the seed and mutation that caused it.
"""
from __future__ import annotations

import json
import random
import signal
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from chatglm.errors import ModelFileError
from chatglm.loaders import load_model, open_checkpoint

from checkpoints import thudm_config, thudm_state_dict, tiny_glm, tiny_llama, write_folder

SEED = 20240604
SLOW_S = 2.0            # a mutant slower than this counts as a hang
ALARM_S = 10            # a real hang is interrupted after this
FULL_LOAD_EVERY = 8     # one mutant in this many is built into a model and run, beyond the NaN/inf ones
HUGE = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 1, 2**62, 2**63 - 1, 2**64 - 1, -1, -2**31, 7, 1000003]
BAD_FLOATS = [float("nan"), float("inf"), float("-inf")]


class Hang(Exception):
    """Raised by the alarm when one load runs far past SLOW_S."""


@dataclass
class Mutant:
    what: str                       # a description to reproduce it: "<mutation> @offset ..."
    data: bytes
    full: bool = False              # build the model and run logits, not only open the checkpoint


@dataclass
class Slot:
    """An integer field of the header: where it is, its width, and what it means."""
    offset: int
    size: int                       # 4 or 8 bytes, little-endian
    kind: str                       # "count", "dtype", "shape", "offset", "value"


# ---------------------------------------------------------------- the valid files and their layout


def _addr(reader: GGUFReader, part: np.ndarray) -> int:
    return part.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0]


def gguf_layout(path: Path) -> tuple[list[Slot], list[int], list[int], int]:
    """Integer slots of a GGUF header, q4_0 block-scale offsets, f32 value offsets, and the data offset."""
    r = GGUFReader(path)
    slots = [Slot(8, 8, "count"), Slot(16, 8, "count")]
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        klen, _kdata, vtype, *rest = f.parts
        slots += [Slot(_addr(r, klen), 8, "count"), Slot(_addr(r, vtype), 4, "dtype")]
        if f.types[0].name == "STRING":
            slots.append(Slot(_addr(r, rest[0]), 8, "count"))
        elif f.types[0].name == "ARRAY":
            slots += [Slot(_addr(r, rest[0]), 4, "dtype"), Slot(_addr(r, rest[1]), 8, "count")]
        elif rest:
            slots.append(Slot(_addr(r, rest[0]), rest[0].nbytes if rest[0].nbytes in (4, 8) else 4, "value"))
    scales, floats = [], []
    for t in r.tensors:
        name_len, _name, n_dims, dims, dtype, offset = t.field.parts
        slots += [Slot(_addr(r, name_len), 8, "count"), Slot(_addr(r, n_dims), 4, "count"),
                  Slot(_addr(r, dtype), 4, "dtype"), Slot(_addr(r, offset), 8, "offset")]
        slots += [Slot(_addr(r, dims) + 8 * i, 8, "shape") for i in range(len(dims))]
        if t.tensor_type == Q.Q4_0:
            scales += range(t.data_offset, t.data_offset + int(t.n_bytes), 18)
        elif t.tensor_type == Q.F32:
            floats += range(t.data_offset, t.data_offset + int(t.n_bytes), 4)
    return slots, scales, floats, int(r.data_offset)


def ggml_layout(data: bytes) -> tuple[list[Slot], list[int], list[int], int]:
    """The same for a chatglm.cpp file: header, config record, tokenizer size, then each tensor's head."""
    slots = [Slot(4, 4, "dtype"), Slot(8, 4, "dtype")] + [Slot(12 + 4 * i, 4, "value") for i in range(13)]
    slots[2].kind = "dtype"
    at = 64
    tok = struct.unpack_from("<i", data, at)[0]
    slots.append(Slot(at, 4, "count"))
    at += 4 + tok
    header_end, scales, floats = 0, [], []
    while at < len(data):
        slots.append(Slot(at, 4, "count"))
        n = struct.unpack_from("<i", data, at)[0]
        at += 4 + n
        ndim = struct.unpack_from("<i", data, at)[0]
        slots.append(Slot(at, 4, "count"))
        shape = struct.unpack_from(f"<{ndim}i", data, at + 4)
        slots += [Slot(at + 4 + 4 * i, 4, "shape") for i in range(ndim)]
        at += 4 + 4 * ndim
        code = struct.unpack_from("<i", data, at)[0]
        slots.append(Slot(at, 4, "dtype"))
        at += 4
        at = (at + 15) // 16 * 16
        header_end = header_end or at
        count = int(np.prod(shape))
        if code == Q.Q4_0.value:
            nbytes = count // 32 * 18
            scales += range(at, at + nbytes, 18)
        else:
            nbytes = count * (4 if code == Q.F32.value else 2)
            if code == Q.F32.value:
                floats += range(at, at + nbytes, 4)
        at += nbytes
    return slots, scales, floats, header_end


# ---------------------------------------------------------------- mutations


def _put_int(data: bytearray, slot: Slot, value: int) -> None:
    data[slot.offset : slot.offset + slot.size] = (value % 2 ** (8 * slot.size)).to_bytes(slot.size, "little")


def binary_mutants(rng: random.Random, data: bytes, layout, count: int) -> list[Mutant]:
    """Truncations, byte flips (mostly in the header), integer fields set to absurd values, bad dtype
    codes and shapes, and NaN/inf written into q4_0 block scales and f32 tensors."""
    slots, scales, floats, header_end = layout
    by_kind: dict[str, list[Slot]] = {}
    for s in slots:
        by_kind.setdefault(s.kind, []).append(s)
    out = []
    for _ in range(count):
        m = bytearray(data)
        op = rng.choice(["truncate", "flip_header", "flip_any", "int", "count", "dtype", "shape", "offset",
                         "nan_scale", "nan_float", "multi"])
        full = False
        if op == "truncate":
            cut = rng.randrange(0, len(data))
            what, m = f"truncate at {cut}", m[:cut]
        elif op in ("flip_header", "flip_any"):
            end = header_end if op == "flip_header" else len(data)
            spots = sorted(rng.randrange(0, end) for _ in range(rng.randint(1, 4)))
            for at in spots:
                m[at] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
            what = f"{op} at {spots}"
        elif op in ("int", "count", "dtype", "shape", "offset"):
            pool = slots if op == "int" else by_kind.get(op, slots)
            slot = rng.choice(pool)
            if op == "dtype":
                value = rng.choice([rng.randrange(0, 42), *HUGE])
            elif op == "shape":
                old = int.from_bytes(data[slot.offset : slot.offset + slot.size], "little")
                value = rng.choice([old + rng.choice([-32, -1, 1, 32]), old * 2, old // 2, *HUGE])
            else:
                value = rng.choice(HUGE + [rng.randrange(0, 4096)])
            _put_int(m, slot, value)
            what = f"set {slot.kind} field @{slot.offset} ({slot.size} bytes) to {value}"
        elif op == "nan_scale" and scales:
            at, bad = rng.choice(scales), rng.choice(BAD_FLOATS)
            m[at : at + 2] = np.float16(bad).tobytes()
            what, full = f"q4_0 block scale @{at} = {bad}", True
        elif op == "nan_float" and floats:
            at, bad = rng.choice(floats), rng.choice(BAD_FLOATS)
            m[at : at + 4] = np.float32(bad).tobytes()
            what, full = f"f32 value @{at} = {bad}", True
        else:  # several integer fields at once
            picks = rng.sample(slots, min(3, len(slots)))
            for slot in picks:
                _put_int(m, slot, rng.choice(HUGE))
            what = f"multi: fields @{[s.offset for s in picks]}"
        out.append(Mutant(what, bytes(m), full or rng.randrange(FULL_LOAD_EVERY) == 0))
    return out


_ST_DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "F8_E4M3", "XX", ""]


def safetensors_mutants(rng: random.Random, data: bytes, count: int) -> list[Mutant]:
    """Raw mutations of the file plus edits of its JSON header: dtypes, shapes, data offsets, NaN data."""
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    names = [k for k in header if k != "__metadata__"]
    out = []
    for _ in range(count):
        op = rng.choice(["truncate", "flip_header", "header_len", "dtype", "shape", "offsets", "nan", "nan", "json"])
        full = False
        if op == "truncate":
            cut = rng.randrange(0, len(data))
            what, m = f"truncate at {cut}", data[:cut]
        elif op == "flip_header":
            b = bytearray(data)
            spots = sorted(rng.randrange(0, 8 + n) for _ in range(rng.randint(1, 3)))
            for at in spots:
                b[at] ^= rng.randrange(1, 256)
            what, m = f"flip header bytes {spots}", bytes(b)
        elif op == "header_len":
            value = rng.choice(HUGE)
            what, m = f"header length = {value}", struct.pack("<Q", value % 2**64) + data[8:]
        elif op == "nan":
            name = rng.choice(names)
            start, end = header[name]["data_offsets"]
            at, bad = rng.randrange(start, end, 4), rng.choice(BAD_FLOATS)
            b = bytearray(data)
            b[8 + n + at : 8 + n + at + 4] = np.float32(bad).tobytes()
            what, m, full = f"{name}[{(at - start) // 4}] = {bad}", bytes(b), True
        else:
            h = json.loads(json.dumps(header))
            name = rng.choice(names)
            if op == "dtype":
                h[name]["dtype"] = rng.choice(_ST_DTYPES)
            elif op == "shape":
                shape = h[name]["shape"]
                choice = rng.randrange(4)
                if choice == 0:
                    shape[rng.randrange(len(shape))] = rng.choice(HUGE)
                elif choice == 1:
                    h[name]["shape"] = shape[::-1]
                elif choice == 2:
                    h[name]["shape"] = shape + [1]
                else:
                    h[name]["shape"] = [int(np.prod(shape))]
            elif op == "offsets":
                offs = h[name]["data_offsets"]
                offs[rng.randrange(2)] = rng.choice(HUGE + [rng.randrange(0, len(body))])
            else:
                h[name] = rng.choice([None, 3, "x", [], {"dtype": "F32"}, {"shape": [1], "data_offsets": [0, 4]}])
            raw = json.dumps(h).encode()
            what, m = f"header {op} of {name}: {json.dumps(h[name])[:120]}", struct.pack("<Q", len(raw)) + raw + body
        out.append(Mutant(what, m, full or rng.randrange(FULL_LOAD_EVERY) == 0))
    return out


_CONFIG_INTS = ["num_layers", "hidden_size", "num_attention_heads", "multi_query_group_num", "kv_channels",
                "ffn_hidden_size", "padded_vocab_size", "seq_length"]


def config_mutants(rng: random.Random, config: dict, count: int) -> list[tuple[str, dict]]:
    """Absurd sizes in config.json: the model's shapes then disagree with the tensors', or are absurd."""
    out = []
    for _ in range(count):
        c = dict(config)
        key = rng.choice(_CONFIG_INTS + ["layernorm_epsilon", "torch_dtype", "rope_ratio"])
        c[key] = rng.choice(HUGE + [0.5, -3, None, "x", float("nan"), [], 10**30])
        if key == "seq_length" and c[key] in (1, 2):
            c[key] = 3  # a context shorter than the 3 test ids is the model's to refuse, not the loader's
        out.append((f"config {key} = {c[key]!r}", c))
    return out


# ---------------------------------------------------------------- running mutants


def _alarm(signum, frame):
    raise Hang(f"no result after {ALARM_S} s")


def check(target: Path, name: str, mutant_what: str, full: bool, failures: list[str]) -> None:
    """Open (and maybe run) one mutant; record anything but success or a ModelFileError naming `name`."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(ALARM_S)
    start = time.perf_counter()
    try:
        if full:
            logits = load_model(target).logits([1, 2, 3])
            if not torch.isfinite(torch.as_tensor(logits)).all():
                failures.append(f"{mutant_what}: loaded silently but gives non-finite logits")
        else:
            open_checkpoint(target)
    except ModelFileError as e:
        if name not in str(e):
            failures.append(f"{mutant_what}: ModelFileError does not name {name!r}: {e}")
    except Hang as e:
        failures.append(f"{mutant_what}: hang: {e}")
    except Exception as e:  # anything else is a loader bug
        failures.append(f"{mutant_what}: {type(e).__name__}: {str(e)[:300]}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    took = time.perf_counter() - start
    if took > SLOW_S:
        failures.append(f"{mutant_what}: took {took:.1f} s")


def report(failures: list[str], total: int) -> None:
    assert not failures, f"{len(failures)} of {total} mutants failed (seed {SEED}); first ones:\n" + "\n".join(
        failures[:12])


# ---------------------------------------------------------------- the valid files, once per module


@pytest.fixture(scope="module")
def glm():
    return tiny_glm(layers=1)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    from test_models import write_llama_gguf

    import gguf

    original = gguf.GGUFWriter.write_header_to_file

    def with_arrays(self, *args, **kwargs):  # arrays, as vocabularies are, so their lengths get fuzzed too
        self.add_array("fuzz.ids", list(range(40)))
        self.add_array("fuzz.words", ["a", "bc", "def", ""])
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf.GGUFWriter, "write_header_to_file", with_arrays)
        path = write_llama_gguf(tmp_path_factory.mktemp("gguf") / "valid.gguf", tiny_llama(layers=1), Q.Q4_0)
    return path.read_bytes(), gguf_layout(path)


@pytest.fixture(scope="module")
def ggml_file(glm):
    from test_ggml import ggml_bytes

    data = ggml_bytes(glm, Q.Q4_0)
    return data, ggml_layout(data)


def test_valid_files_load(tmp_path, gguf_file, ggml_file, glm):
    """The unmutated files load, so every refusal below is the mutation's doing."""
    for name, (data, layout) in {"v.gguf": gguf_file, "v.bin": ggml_file}.items():
        (tmp_path / name).write_bytes(data)
        assert torch.isfinite(torch.as_tensor(load_model(tmp_path / name).logits([1, 2, 3]))).all()
        assert layout[1] and layout[2]  # there are q4_0 scales and f32 values to spoil
    folder = write_folder(tmp_path / "hf", thudm_config(glm), thudm_state_dict(glm))
    assert torch.isfinite(torch.as_tensor(load_model(folder).logits([1, 2, 3]))).all()


@pytest.mark.parametrize("kind", ["gguf", "ggml"])
def test_fuzz_binary(tmp_path, kind, gguf_file, ggml_file):
    data, layout = gguf_file if kind == "gguf" else ggml_file
    name = "fuzz.gguf" if kind == "gguf" else "fuzz.bin"
    rng = random.Random(f"{SEED}-{kind}")
    target, failures = tmp_path / name, []
    mutants = binary_mutants(rng, data, layout, 1200)
    for i, m in enumerate(mutants):
        target.write_bytes(m.data)
        check(target, name, f"[{kind} #{i}] {m.what}", m.full, failures)
    report(failures, len(mutants))


def test_fuzz_safetensors(tmp_path, glm):
    folder = write_folder(tmp_path / "fuzzhf", thudm_config(glm), thudm_state_dict(glm))
    shard = folder / "model.safetensors"
    data = shard.read_bytes()
    rng = random.Random(f"{SEED}-safetensors")
    failures: list[str] = []
    mutants = safetensors_mutants(rng, data, 900)
    for i, m in enumerate(mutants):
        shard.write_bytes(m.data)
        check(folder, "fuzzhf", f"[safetensors #{i}] {m.what}", m.full, failures)
    shard.write_bytes(data)
    configs = config_mutants(rng, thudm_config(glm), 150)
    for i, (what, cfg) in enumerate(configs):
        (folder / "config.json").write_text(json.dumps(cfg))
        check(folder, "fuzzhf", f"[config #{i}] {what}", True, failures)
    report(failures, len(mutants) + len(configs))
