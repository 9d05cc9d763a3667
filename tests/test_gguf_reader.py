"""Our one-pass GGUF header reader against the gguf package's GGUFReader, zero-copy tensors, and the
finite check over block scales against gguf.quants' decoded values."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from chatglm.loaders import all_finite
from chatglm.loaders.gguf import read_gguf
from chatglm.quant import QTensor, dequantize


@pytest.fixture(scope="module")
def both(default_gguf):
    return read_gguf(default_gguf), GGUFReader(default_gguf)


def test_metadata_and_tensor_table_match_gguf_reader(both):
    ours, reference = both
    fields = {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    assert ours.meta.keys() == fields.keys()
    for key, value in fields.items():
        assert ours.meta[key] == pytest.approx(value) if isinstance(value, float) else ours.meta[key] == value, key
    assert list(ours.tensors) == [t.name for t in reference.tensors]
    for t in reference.tensors:
        mine = ours.tensors[t.name]
        assert (mine.shape, mine.qtype, mine.start, mine.nbytes) == (
            tuple(int(d) for d in reversed(t.shape)), t.tensor_type, t.data_offset, t.n_bytes), t.name


def test_tensors_are_views_of_the_mapping(both):
    ours, reference = both
    base = np.frombuffer(ours.buffer, np.uint8).ctypes.data
    for t in reference.tensors[:8]:
        w = ours.tensor(t.name)
        data = w.raw if isinstance(w, QTensor) else w
        assert base <= data.data_ptr() < base + len(ours.buffer)  # the file's pages, not a copy
        assert data.numpy().tobytes() == np.asarray(t.data).tobytes()


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("at", [0, 2], ids=["byte0", "byte2"])  # q4_1: scale and minimum; q8_0: scale and codes
@pytest.mark.parametrize("value", [np.inf, np.nan, -np.inf])
def test_finite_check_agrees_with_decoding(both, qtype, at, value):
    """A non-finite f16 written at a block's byte 0 or 2: refused exactly when gguf.quants decodes non-finite values."""
    ours, _ = both
    name = next(n for n, t in ours.tensors.items() if t.qtype == qtype)
    w = ours.tensor(name)
    raw = w.raw.clone()
    assert all_finite(QTensor(raw, qtype, w.shape))
    offset = 37 * raw.shape[1] + 5 * {Q.Q4_1: 20, Q.Q8_0: 34}[qtype] + at  # row 37, block 5
    raw.view(-1)[offset : offset + 2] = torch.tensor([value], dtype=torch.float16).view(torch.uint8)
    with np.errstate(invalid="ignore"):  # inf * 0 in the reference decoder
        decoded_finite = bool(np.isfinite(dequantize(raw.numpy(), qtype, w.shape)).all())
    assert all_finite(QTensor(raw, qtype, w.shape)) == decoded_finite
    assert decoded_finite == (qtype == Q.Q8_0 and at == 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_check_on_float_tensors(dtype):
    w = torch.randn(3000, 700).to(dtype)
    assert all_finite(w)
    for bad in (np.inf, np.nan, -np.inf):
        v = w.clone()
        v[2999, 699] = bad
        assert not all_finite(v) and not all_finite(v.t())
