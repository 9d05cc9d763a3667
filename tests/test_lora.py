"""LoRA adapters merged at load, against PEFT's own merge_and_unload."""
from __future__ import annotations

import pytest
import torch

from chatglm import load_model
from chatglm.errors import ModelFileError

from checkpoints import tiny_glm, tiny_llama
from test_models import IDS, reference_logits, rel_err

peft = pytest.importorskip("peft", reason="peft is a test extra (make install)")


def adapter(model, folder, targets, alpha=16, fan_in_fan_out=False):
    cfg = peft.LoraConfig(r=4, lora_alpha=alpha, target_modules=targets, fan_in_fan_out=fan_in_fan_out)
    wrapped = peft.get_peft_model(model, cfg)
    # PEFT starts B at zero; give the adapter something to say, at a trained adapter's scale: deltas near the base
    # weights' size (changing the logits by 20-60%), not 70x them (std 0.3 once: a model so ill-conditioned that
    # float32 rounding alone moved its logits by 1e-4, in transformers and here)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    wrapped.save_pretrained(folder)
    return wrapped.merge_and_unload()


@pytest.mark.parametrize("make,targets", [(tiny_glm, ["q_proj", "v_proj", "down_proj"]),
                                          (tiny_llama, ["q_proj", "k_proj", "gate_proj", "o_proj"])])
def test_merge_matches_peft(tmp_path, make, targets):
    base = make()
    base.save_pretrained(tmp_path / "base")
    merged = adapter(make(), tmp_path / "lora", targets)
    ours = load_model(tmp_path / "base", dtype="f32", lora=tmp_path / "lora")
    assert rel_err(ours.logits(IDS), reference_logits(merged)) < 1e-4
    plain = load_model(tmp_path / "base", dtype="f32")
    assert rel_err(plain.logits(IDS), reference_logits(merged)) > 1e-3  # the adapter changed something


def test_adapter_for_another_model_is_refused(tmp_path):
    tiny_glm().save_pretrained(tmp_path / "base")
    adapter(tiny_llama(), tmp_path / "lora", ["gate_proj"])  # GLM fuses gate and up: no such tensor
    with pytest.raises(ModelFileError, match="targets tensors the model does not have"):
        load_model(tmp_path / "base", lora=tmp_path / "lora")


def test_missing_adapter_folder(tmp_path):
    tiny_glm(layers=1).save_pretrained(tmp_path / "base")
    with pytest.raises(ModelFileError, match="LoRA adapter folder not found"):
        load_model(tmp_path / "base", lora=tmp_path / "nope")
