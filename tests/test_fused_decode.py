"""The fused one-token step (kernels/csrc/decode_step.cpp) against the torch blocks it replaces, with the
same ggml-block weights: llama with biases and half-split rotary, GLM-4 with partial interleaved rotary and
grouped keys, a P-Tuning prefix; a batch at mixed positions in scattered cache slots. And on the default
model, the step really is fused and agrees with the torch blocks."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from chatglm import load_model
from chatglm.kernels import ggml
from chatglm.kernels.ggml import GGMLLinear, fused_decoder
from chatglm.quant import QTensor, QType

from checkpoints import tiny_glm, tiny_llama

pytestmark = pytest.mark.skipif(not ggml.available(), reason="the C++ kernels were not built on this machine")

PROMPTS = [[5, 17, 3, 44, 9, 61, 2], [8, 30, 71], [12, 6, 90, 33, 1]]


def blocks_of(w: torch.Tensor, qtype: QType) -> QTensor:
    raw = gguf.quants.quantize(w.float().numpy(), gguf.GGMLQuantizationType(int(qtype)))
    return QTensor(torch.from_numpy(raw.reshape(w.shape[0], -1)), qtype, tuple(w.shape))


def to_blocks(model, qtype: QType) -> None:
    """Every block linear of a float model as ggml blocks, and the fused step built over them."""
    for block in model.layers:
        for name in ("qkv", "o", "gate_up", "down"):
            dense = getattr(block, name)
            setattr(block, name, GGMLLinear(blocks_of(dense.weight, qtype), dense.bias, torch.float32))
    model.fused = fused_decoder(model.layers, model.config)
    assert model.fused is not None


def batched_step(model) -> torch.Tensor:
    """Each prompt but its last token alone in a slot, then one step for all three: [3, vocab]."""
    cache = model.new_cache(4, 16)
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


def test_fused_step_reads_the_ptuning_prefix(tmp_path):
    tiny_glm().save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    cfg = model.config
    torch.manual_seed(1)
    model.prefix = torch.randn(cfg.num_layers, 2, 4, cfg.num_kv_heads, cfg.head_dim)  # 4 virtual tokens
    to_blocks(model, QType.Q8_0)
    fused = batched_step(model)
    reference = without_fused(model, batched_step)
    assert torch.abs(fused - reference).max() < 1e-4 * torch.abs(reference).max()


def test_default_model_decodes_fused(default_gguf):
    model = load_model(default_gguf)
    assert model.fused is not None, "the default model's ggml blocks should take the fused step"
    ids = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173]

    def steps(m) -> np.ndarray:
        cache = m.new_cache(1, 32)
        slot = torch.zeros(1, dtype=torch.long)
        m(torch.tensor([ids]), torch.arange(len(ids))[None], cache, slot)
        return m(torch.tensor([[42]]), torch.tensor([[len(ids)]]), cache, slot)[0, -1].numpy()

    fused, reference = steps(model), without_fused(model, steps)
    assert np.abs(fused - reference).max() < 1e-3 * np.abs(reference).max()
    assert fused.argmax() == reference.argmax()
