"""GLM-4-0414/Z1, GLM-4.5/4.6 and GLM-4.7-Flash against transformers' own Glm4ForCausalLM,
Glm4MoeForCausalLM and Glm4MoeLiteForCausalLM on tiny random configs written with save_pretrained."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from chatglm import load_model
from chatglm.models.glm4_moe_lite import LatentCache

from checkpoints import tiny_glm4, tiny_glm4_moe, tiny_glm4_moe_lite

IDS = [5, 17, 3, 88, 42, 9, 61, 30, 2, 77, 14]
OTHER = [40, 8, 95, 23, 50, 6, 71]
TOL = 1e-4


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def reference(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def saved(model, folder):
    model.save_pretrained(folder)
    return load_model(folder, dtype="f32")


BUILDERS = {"glm4": tiny_glm4, "glm4_moe": tiny_glm4_moe, "glm4_moe_lite": tiny_glm4_moe_lite}


@pytest.fixture(params=list(BUILDERS), scope="module")
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its save_pretrained folder)."""
    ref = BUILDERS[request.param]()
    ours = saved(ref, tmp_path_factory.mktemp(request.param))
    assert ours.config.arch == request.param
    return ref, ours


def test_prefill_matches_transformers(pair):
    ref, ours = pair
    assert rel_err(ours.logits(IDS), reference(ref, IDS)) < TOL


def test_cached_decode_matches_transformers(pair):
    """Prefill 5 tokens, then one token at a time through the cache."""
    ref, ours = pair
    cache = ours.new_cache(1, len(IDS))
    slots = torch.zeros(1, dtype=torch.long)
    out = [ours(torch.tensor([IDS[:5]]), torch.arange(5)[None], cache, slots)[0]]
    for i in range(5, len(IDS)):
        out.append(ours(torch.tensor([[IDS[i]]]), torch.tensor([[i]]), cache, slots)[0])
    assert rel_err(torch.cat(out).numpy(), reference(ref, IDS)) < TOL


def test_batched_decode_at_mixed_positions(pair):
    """Two sequences of different lengths in slots 1 and 0 decode their next tokens in one batched step."""
    ref, ours = pair
    first, second = IDS, OTHER
    cache = ours.new_cache(2, 16)
    for slot, ids in ((1, first[:-1]), (0, second[:-1])):
        ours(torch.tensor([ids]), torch.arange(len(ids))[None], cache, torch.tensor([slot]))
    step = ours(torch.tensor([[first[-1]], [second[-1]]]), torch.tensor([[len(first) - 1], [len(second) - 1]]),
                cache, torch.tensor([1, 0]))
    assert rel_err(step[0, 0].numpy(), reference(ref, first)[-1]) < TOL
    assert rel_err(step[1, 0].numpy(), reference(ref, second)[-1]) < TOL
