"""GLM-4.7-Flash's one-call decode step (kernels/csrc/latent_moe_step.cpp) against the torch blocks it replaces
(which tests/test_glm4_families.py checks against transformers' Glm4MoeLiteForCausalLM), with the same ggml-block
weights: latent attention with and without the query bottleneck, biases, grouped routing, the shared expert and
the dense first layer; a batch at mixed positions in scattered cache blocks; and a GGUF file as llama.cpp lays it
out, whose attn_k_b / attn_v_b blocks the step reads in place. The experts (moe_ffn.h) are GLM-4.5's too, whose
step (decode_step.cpp) goes through the same engine and synthetic-file checks here."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from chatglm import load_model
from chatglm.kernels import ggml
from chatglm.kernels.ggml import GGMLLinear, latent_moe_decoder
from chatglm.quant import QType

from checkpoints import tiny_glm4_moe, tiny_glm4_moe_lite
from test_fused_decode import batched_step, blocks_of, engine_replies_agree, without_fused

pytestmark = pytest.mark.skipif(not ggml.available(), reason="the C++ kernels were not built on this machine")

# every linear's inputs whole 32-value blocks (nope 32, not the tiny default's 24)
WIDTHS = dict(qk_nope_head_dim=32, kv_lora_rank=32, v_head_dim=16, qk_rope_head_dim=8)


def to_blocks(model, qtype: QType) -> None:
    """Every block linear of a float model as ggml blocks, kv_b's halves as each head's k_b [rank, nope] and
    v_b [value, rank] (llama.cpp's attn_k_b / attn_v_b), and the one-call step built over them."""
    def blocked(m: nn.Module) -> GGMLLinear:
        return GGMLLinear(blocks_of(m.weight, qtype), m.bias, torch.float32)

    for block in model.layers:
        a = block.attn
        for name in ("q_a", "q_b", "q", "kv_a", "o"):
            if hasattr(a, name):
                setattr(a, name, blocked(getattr(a, name)))
        a.k_b = nn.ModuleList(GGMLLinear(blocks_of(k.T.contiguous(), qtype), None, torch.float32) for k in a.k_up)
        a.v_b = nn.ModuleList(GGMLLinear(blocks_of(v, qtype), None, torch.float32) for v in a.v_up)
        del a.k_up, a.v_up
        mlps = list(block.ffn.experts) + [block.ffn.shared] if hasattr(block.ffn, "experts") else [block.ffn]
        for mlp in filter(None, mlps):
            mlp.gate_up, mlp.down = blocked(mlp.gate_up), blocked(mlp.down)
    model.fused = latent_moe_decoder(model.layers, model.config)
    assert model.fused is not None


def assert_close(fused: torch.Tensor, reference: torch.Tensor) -> None:
    assert torch.abs(fused - reference).max() < 1e-4 * torch.abs(reference).max()


CONFIGS = {
    "bottleneck-q4_0": (dict(WIDTHS), QType.Q4_0),
    # one query projection, biases on q/kv_a/o, experts in 2 groups of which the best one is kept
    "grouped-bias-q8_0": (dict(WIDTHS, q_lora_rank=None, attention_bias=True, n_group=2, topk_group=1), QType.Q8_0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_step_matches_the_torch_blocks(tmp_path, name):
    settings, qtype = CONFIGS[name]
    tiny_glm4_moe_lite(**settings).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    to_blocks(model, qtype)
    fused = batched_step(model)
    assert_close(fused, without_fused(model, batched_step))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_step_reads_small_blocks_through_the_table(tmp_path, dtype):
    """Blocks of 2 rows in a scrambled order, the latent cache in float32 or float16 (llama.cpp's)."""
    tiny_glm4_moe_lite(**WIDTHS).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    to_blocks(model, QType.Q4_0)
    fused = batched_step(model, block_size=2, dtype=dtype)
    assert_close(fused, without_fused(model, lambda m: batched_step(m, block_size=2, dtype=dtype)))


def test_bad_step_inputs_are_refused_by_name(tmp_path):
    tiny_glm4_moe_lite(**WIDTHS).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="f32")
    to_blocks(model, QType.Q8_0)
    cache = model.new_cache(1, 4)
    x, at, rope = torch.zeros(1, model.config.hidden_size), torch.zeros(1, dtype=torch.long), torch.view_as_real(model.rope)
    with pytest.raises(RuntimeError, match=r"the cache must be float32 or float16 \[layers, 1, 1, blocks, block_size, 40\]"):
        model.fused.step(x, cache.kv[..., :-1].contiguous(), cache.tables[:1], at, at, rope)
    with pytest.raises(RuntimeError, match="block table entry 0 is 0, not a block of the pool"):
        model.fused.step(x, cache.kv, torch.zeros_like(cache.tables[:1]), at, at, rope)


def test_a_gguf_file_takes_the_fused_step_reading_its_blocks(tmp_path):
    """A GGUF written as llama.cpp's deepseek2 (kv_b split into attn_k_b and attn_v_b): the model reads each head's
    part from the file's blocks, takes the one-call step, and agrees with its torch blocks."""
    from chatglm.convert import convert

    from test_convert import write_bpe_tokenizer

    tiny_glm4_moe_lite(vocab_size=write_bpe_tokenizer(tmp_path), **WIDTHS).save_pretrained(tmp_path)
    model = load_model(convert(tmp_path, tmp_path / "m.gguf", "q8_0", progress=False))
    assert model.fused is not None
    a = model.layers[0].attn
    assert all(isinstance(m, GGMLLinear) for m in [*a.k_b, *a.v_b]) and not hasattr(a, "k_up")
    assert_close(batched_step(model), without_fused(model, batched_step))


def test_a_gguf_files_latent_blocks_stay_blocks_and_are_shape_checked(tmp_path):
    """sanitize keeps a GGUF's attn_k_b / attn_v_b blocks without building a float kv_b beside them (for the real
    model that was ~860 MB made and dropped at every load), and a wrong attn_v_b is named with the shape expected."""
    import chatglm.models.glm4_moe_lite as lite
    from chatglm.convert import convert
    from chatglm.errors import ModelFileError
    from chatglm.loaders import open_checkpoint
    from chatglm.loaders.names import assemble
    from chatglm.quant import QTensor

    from test_convert import write_bpe_tokenizer

    tiny_glm4_moe_lite(vocab_size=write_bpe_tokenizer(tmp_path), **WIDTHS).save_pretrained(tmp_path)
    path = convert(tmp_path, tmp_path / "m.gguf", "q8_0", progress=False)
    ckpt = open_checkpoint(path)
    weights = lite.sanitize(assemble(ckpt.layout, ckpt.get, path, ckpt.transforms), ckpt.config, path)
    assert not any(c.endswith("kv_b") for c in weights)
    assert all(isinstance(weights[f"layers.{i}.{p}"], QTensor) for i in range(ckpt.config.num_layers)
               for p in ("k_b", "v_b"))
    cfg = ckpt.config
    bad = dict(weights, **{"layers.1.v_b": weights["layers.1.k_b"]})
    with pytest.raises(ModelFileError, match=r"v_b.*expected \[%d, %d\]" % (
            cfg.num_heads * cfg.latent.value_dim, cfg.latent.kv_rank)):
        lite.Glm4MoeLiteDecoder(cfg, bad, torch.float32, source=path)


@pytest.mark.parametrize("name", ["glm4-moe-lite-tiny", "glm4-moe-tiny"])
def test_steps_on_a_synthetic_file_agree_with_llama_cpp(tmp_path, llama_cpp, name):
    """`--synthetic-layers`: the tiny GLM-4.7-Flash and GLM-4.5 shapes with 4 layers, every token through the
    one-call step (latent_moe_step.cpp, decode_step.cpp), against llama.cpp's logits on the same file (float32
    caches both)."""
    import numpy as np

    from chatglm.synthetic import synthetic_gguf

    from test_convert import llama_cpp_logits
    from test_glm4_families import rel_err

    path = synthetic_gguf(name, "q4_0", tmp_path, layers=4)
    assert path.name == f"synthetic-{name}-4l-q4_0.gguf"
    model = load_model(path)
    assert model.config.num_layers == 4 and model.fused is not None
    ids = [100, 2000, 300, 40, 5000, 6]
    cache, slot = model.new_cache(1, 8, dtype=torch.float32), torch.zeros(1, dtype=torch.long)
    mine = np.stack([model(torch.tensor([[t]]), torch.tensor([[i]]), cache, slot)[0, -1].numpy()
                     for i, t in enumerate(ids)])
    llm = llama_cpp.Llama(str(path), logits_all=True, verbose=False, n_ctx=64, type_k=0, type_v=0)
    try:
        assert rel_err(llama_cpp_logits(llm, ids), mine) < 3e-2
    finally:
        llm.close()


@pytest.mark.parametrize("family", ["glm4_moe_lite", "glm4_moe"])
def test_continuous_batching_replies_match_the_torch_blocks(tmp_path, family):
    """Greedy replies of three prompts decoded together by the engine, from a converted GGUF: the same tokens with
    and without the step (GLM-4.5's as llama.cpp's glm4moe: one expert group, no MTP layer)."""
    from chatglm.convert import convert

    from test_convert import write_bpe_tokenizer

    vocab = write_bpe_tokenizer(tmp_path)
    ref = (tiny_glm4_moe_lite(vocab_size=vocab, **WIDTHS) if family == "glm4_moe_lite" else
           tiny_glm4_moe(vocab_size=vocab, n_group=1, num_nextn_predict_layers=0))
    ref.save_pretrained(tmp_path)
    model = load_model(convert(tmp_path, tmp_path / "m.gguf", "q8_0", progress=False))
    assert model.config.arch == family and model.fused is not None
    engine_replies_agree(model, [[5, 17, 3, 44], [8, 30, 71, 2, 9, 61], [12, 6]])
