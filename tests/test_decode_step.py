"""The one-token decode path (grouped float32 attention over the cache) against transformers'
models, for batches whose sequences sit at different positions in non-consecutive cache slots."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from chatglm import load_model

from checkpoints import tiny_glm, tiny_llama

PROMPTS = [[5, 17, 3, 44, 9, 61, 2], [8, 30, 71], [12, 6, 90, 33, 1]]


def reference_last_logits(hf, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1].float().numpy()


@pytest.mark.parametrize("make", [tiny_llama, tiny_glm], ids=["llama", "glm4"])
def test_batched_step_at_mixed_positions_matches_transformers(tmp_path, make):
    hf = make()
    hf.save_pretrained(tmp_path / "tf")
    model = load_model(tmp_path / "tf", dtype="f32")
    cache = model.new_cache(4, 16)
    slots = [3, 0, 2]  # not a range: the step gathers each sequence's rows
    for slot, ids in zip(slots, PROMPTS):  # each prompt but its last token, alone in its slot
        model(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1)[None], cache, torch.tensor([slot]))
    last = torch.tensor([[ids[-1]] for ids in PROMPTS])
    pos = torch.tensor([[len(ids) - 1] for ids in PROMPTS])
    logits = model(last, pos, cache, torch.tensor(slots))[:, -1].numpy()
    for row, ids in enumerate(PROMPTS):
        expected = reference_last_logits(hf, ids)
        assert np.abs(logits[row] - expected).max() < 1e-4 * np.abs(expected).max(), f"sequence {row}"


def test_consecutive_slots_read_the_cache_in_place(tmp_path):
    """Slots 1..2 take the slice path; positions differ, so the mask still applies per row."""
    hf = tiny_llama()
    hf.save_pretrained(tmp_path / "tf")
    model = load_model(tmp_path / "tf", dtype="f32")
    cache = model.new_cache(3, 16)
    prompts = PROMPTS[:2]
    for slot, ids in zip((1, 2), prompts):
        model(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1)[None], cache, torch.tensor([slot]))
    logits = model(torch.tensor([[ids[-1]] for ids in prompts]), torch.tensor([[len(ids) - 1] for ids in prompts]),
                   cache, torch.tensor([1, 2]))[:, -1].numpy()
    for row, ids in enumerate(prompts):
        expected = reference_last_logits(hf, ids)
        assert np.abs(logits[row] - expected).max() < 1e-4 * np.abs(expected).max()
