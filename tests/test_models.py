"""Logits against the official modeling code (oracle files) and transformers' GlmModel / LlamaModel."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chatglm import load_model
from chatglm.loaders import quantized_activations

from checkpoints import (SHARED, permute_for_gguf, read_oracle, thudm_config, thudm_state_dict, tiny_glm, tiny_llama,
                         write_folder)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def steps_logits(model, ids_steps):
    """Run the oracle's three steps through the KV cache: prefill 3, then one token twice."""
    cache = model.new_cache(1, sum(len(ids) for ids in ids_steps))
    slots = torch.zeros(1, dtype=torch.long)
    out, start = [], 0
    for ids in ids_steps:
        t = torch.tensor([ids])
        pos = torch.arange(start, start + len(ids))[None]
        out.append(model(t, pos, cache, slots)[0].numpy())
        start += len(ids)
    return np.concatenate(out)


GLM3_SIZES = [(5, 32), (32,), (48, 32), (48,), (32, 32), (32,), (96, 32), (32, 48), (32,)]
GLM3_NAMES = ["transformer.embedding.word_embeddings.weight", "transformer.encoder.layers.0.input_layernorm.weight",
              "transformer.encoder.layers.0.self_attention.query_key_value.weight",
              "transformer.encoder.layers.0.self_attention.query_key_value.bias",
              "transformer.encoder.layers.0.self_attention.dense.weight",
              "transformer.encoder.layers.0.post_attention_layernorm.weight",
              "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight",
              "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight", "transformer.encoder.final_layernorm.weight"]


GLM3_CONFIG = {"model_type": "chatglm", "num_layers": 1, "hidden_size": 32, "num_attention_heads": 8,
               "multi_query_attention": True, "multi_query_group_num": 2, "kv_channels": 4, "ffn_hidden_size": 48,
               "padded_vocab_size": 5, "layernorm_epsilon": 1e-5, "add_qkv_bias": True, "seq_length": 16,
               "torch_dtype": "float32"}


def check_glm3_oracle(tmp_path, name, skip=0, extra_state=None, extra_config=None, tol=1e-4):
    weights, steps = read_oracle(name, GLM3_SIZES, skip)
    state = dict(zip(GLM3_NAMES, weights), **(extra_state or {}))
    head = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    state["transformer.output_layer.weight"] = head
    model = load_model(write_folder(tmp_path / "glm3", dict(GLM3_CONFIG, **(extra_config or {})), state), dtype="f32")
    expected = torch.cat([h for _, h in steps]) @ head.T
    assert rel_err(model.logits([0, 1, 2, 3, 4]), expected) < tol
    assert rel_err(steps_logits(model, [ids for ids, _ in steps]), expected) < tol
    return model


def test_glm3_matches_official_code(shared_dir, tmp_path):
    check_glm3_oracle(tmp_path, "glm3_model.data")


def ptuning_prefix() -> torch.Tensor:
    """The oracle's prefix [layers*2, kv_heads, pre_seq_len, head_dim] as the HF prefix_encoder embedding."""
    raw = np.frombuffer((SHARED / "oracles" / "glm3_ptuning_v2_model.data").read_bytes()[:160], np.float16)
    prefix = torch.from_numpy(raw.astype(np.float32).reshape(2, 2, 5, 4))
    return prefix.permute(2, 0, 1, 3).reshape(5, 2 * 2 * 4)


def test_glm3_ptuning_v2_matches_official_code(shared_dir, tmp_path):
    embedding = {"transformer.prefix_encoder.embedding.weight": ptuning_prefix()}
    model = check_glm3_oracle(tmp_path, "glm3_ptuning_v2_model.data", skip=160, extra_state=embedding,
                              extra_config={"pre_seq_len": 5, "prefix_projection": False}, tol=5e-3)
    assert model.prefix_len == 5


def test_ptuning_prefix_projection_applies_the_mlp(shared_dir, tmp_path):
    """With prefix_projection the embedding goes through Linear-Tanh-Linear before it becomes keys/values."""
    g = torch.Generator().manual_seed(5)
    emb, w0, b0, w2 = torch.randn(5, 32, generator=g), torch.randn(24, 32, generator=g), torch.randn(24, generator=g), \
        torch.randn(16, 24, generator=g) * 0.3
    b2 = torch.randn(16, generator=g)
    projected = torch.tanh(emb @ w0.T + b0) @ w2.T + b2
    mlp = {"transformer.prefix_encoder.embedding.weight": emb, "transformer.prefix_encoder.trans.0.weight": w0,
           "transformer.prefix_encoder.trans.0.bias": b0, "transformer.prefix_encoder.trans.2.weight": w2,
           "transformer.prefix_encoder.trans.2.bias": b2}
    weights, _ = read_oracle("glm3_model.data", GLM3_SIZES)
    base = dict(zip(GLM3_NAMES, weights), **{"transformer.output_layer.weight": torch.eye(5, 32)})
    with_mlp = load_model(write_folder(tmp_path / "a", dict(GLM3_CONFIG, prefix_projection=True), dict(base, **mlp)))
    plain = load_model(write_folder(tmp_path / "b", GLM3_CONFIG,
                                    dict(base, **{"transformer.prefix_encoder.embedding.weight": projected})))
    assert with_mlp.prefix_len == 5
    assert rel_err(with_mlp.logits([0, 1, 2, 3]), plain.logits([0, 1, 2, 3])) < 1e-5


BAICHUAN_SIZES = [(5, 32), (32,), (96, 32), (32, 32), (32,), (96, 32), (32, 96), (96, 32), (32,)]
BAICHUAN_NAMES = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                  "model.layers.0.self_attn.W_pack.weight", "model.layers.0.self_attn.o_proj.weight",
                  "model.layers.0.post_attention_layernorm.weight", "model.layers.0.mlp.gate_proj.weight",
                  "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"]


def test_baichuan_matches_official_code(shared_dir, tmp_path):
    weights, steps = read_oracle("baichuan7b_model.data", BAICHUAN_SIZES)
    state = dict(zip(BAICHUAN_NAMES, weights))
    head = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    state["lm_head.weight"] = head
    cfg = {"model_type": "baichuan", "architectures": ["BaichuanForCausalLM"], "hidden_size": 32,
           "intermediate_size": 96, "num_attention_heads": 8, "num_hidden_layers": 1, "rms_norm_eps": 1e-6,
           "vocab_size": 5, "max_position_embeddings": 16, "torch_dtype": "float32"}
    model = load_model(write_folder(tmp_path / "baichuan", cfg, state, fmt="bin"), dtype="f32")
    expected = torch.cat([h for _, h in steps]) @ head.T
    assert rel_err(model.logits([0, 1, 2, 3, 4]), expected) < 1e-4
    assert rel_err(steps_logits(model, [ids for ids, _ in steps]), expected) < 1e-4


IDS = [3, 17, 42, 5, 88, 61, 7, 7, 30, 2, 95, 14]


def reference_logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("fmt,shards", [("safetensors", 1), ("safetensors", 3), ("bin", 2)])
def test_glm_transformers_folder(tmp_path, fmt, shards):
    glm = tiny_glm()
    glm.save_pretrained(tmp_path / "tf")
    ours = load_model(tmp_path / "tf", dtype="f32")
    assert ours.config.num_kv_heads == 2 and ours.config.rope_dim == 4
    assert rel_err(ours.logits(IDS), reference_logits(glm)) < 1e-4
    thudm = write_folder(tmp_path / "thudm", thudm_config(glm), thudm_state_dict(glm), fmt=fmt, shards=shards)
    assert rel_err(load_model(thudm, dtype="f32").logits(IDS), reference_logits(glm)) < 1e-4


def test_glm_bf16(tmp_path):
    glm = tiny_glm(dtype=torch.bfloat16)
    glm.save_pretrained(tmp_path / "tf")
    ours = load_model(tmp_path / "tf")
    assert ours.dtype == torch.bfloat16
    assert rel_err(ours.logits(IDS), reference_logits(glm)) < 5e-2


@pytest.mark.parametrize("tie", [False, True])
def test_llama_transformers_folder(tmp_path, tie):
    llama = tiny_llama(tie=tie)
    llama.save_pretrained(tmp_path / "tf")
    ours = load_model(tmp_path / "tf", dtype="f32")
    assert ours.config.tie_embeddings == tie
    assert rel_err(ours.logits(IDS), reference_logits(llama)) < 1e-4


def test_llama_bf16_and_decode_consistency(tmp_path):
    llama = tiny_llama(dtype=torch.bfloat16, layers=2)
    llama.save_pretrained(tmp_path / "tf")
    ours = load_model(tmp_path / "tf")
    assert rel_err(ours.logits(IDS), reference_logits(llama)) < 5e-2
    f32 = load_model(tmp_path / "tf", dtype="f32")
    full = f32.logits(IDS)
    stepped = steps_logits(f32, [IDS[:4]] + [[i] for i in IDS[4:]])
    assert rel_err(stepped, full) < 1e-5


def test_internlm_biases(tmp_path):
    llama = tiny_llama(bias=True)
    sd = llama.state_dict()
    cfg = json.loads(llama.config.to_json_string())
    cfg.update(model_type="internlm", bias=True)
    with torch.no_grad():  # InternLM also biases o_proj; give the reference one and keep it
        llama.model.layers[0].self_attn.o_proj.bias = torch.nn.Parameter(torch.rand(llama.config.hidden_size))
        for layer in llama.model.layers[1:]:
            layer.self_attn.o_proj.bias = torch.nn.Parameter(torch.zeros(llama.config.hidden_size))
        sd = llama.state_dict()
    write_folder(tmp_path / "internlm", cfg, sd)
    ours = load_model(tmp_path / "internlm", dtype="f32")
    assert ours.config.o_bias
    assert rel_err(ours.logits(IDS), reference_logits(llama)) < 1e-4


def gguf_with_shape(path, arch: str, c, rope_dims: int):
    """A GGUFWriter holding a transformers config's sizes under `arch`'s keys."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(rope_dims)
    return w


def write_llama_gguf(path, llama, qtype=None, arch="llama"):
    """A llama GGUF with llama.cpp's names and q/k permutation; 2-D weights optionally quantized."""
    import gguf

    c = llama.config
    w = gguf_with_shape(path, arch, c, c.hidden_size // c.num_attention_heads)
    sd = {k: v.float() for k, v in llama.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for hf, gg in parts.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        t = sd[hf]
        if ".attn_q." in gg:
            t = permute_for_gguf(t, c.num_attention_heads)
        elif ".attn_k." in gg:
            t = permute_for_gguf(t, c.num_key_value_heads)
        arr = t.numpy()
        if qtype is not None and arr.ndim == 2:
            w.add_tensor(gg, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gg, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", ["llama", "baichuan", "internlm2"])
def test_llama_gguf_float_matches_transformers(tmp_path, arch):
    """llama.cpp's llama, Baichuan(-7B) and InternLM2 files share tensor names and the q/k permutation."""
    llama = tiny_llama()
    ours = load_model(write_llama_gguf(tmp_path / "tiny.gguf", llama, arch=arch))
    assert ours.config.rope_interleaved and not ours.config.extra["alibi"]
    assert rel_err(ours.logits(IDS), reference_logits(llama)) < 1e-4


@pytest.mark.parametrize("qname", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1"])
def test_llama_gguf_quantized_matches_dequantized_reference(tmp_path, qname):
    """A quantized file computes what the dequantized weights compute (float32 activations)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qname]
    llama = tiny_llama(head_dim=32, heads=2, kv_heads=1)
    path = write_llama_gguf(tmp_path / "q.gguf", llama, qtype)
    reader = gguf.GGUFReader(path)
    deq = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()) for t in reader.tensors}
    c = llama.config
    with torch.no_grad():  # put the dequantized values back into the reference (undoing the permutation)
        sd = llama.state_dict()
        inverse = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}
        for name, t in deq.items():
            if t.dim() != 2:
                continue
            for key, heads in inverse.items():
                if f".{key}." in name:
                    t = t.reshape(heads, t.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(t.shape)
            hf = _hf_name(name)
            sd[hf].copy_(t.reshape(sd[hf].shape))
    exact = load_model(path, dtype="f32")  # float32 activations: exact up to summation order
    assert rel_err(exact.logits(IDS), reference_logits(llama)) < 1e-4
    fast = load_model(path)  # the default: llama.cpp's numerics on the C++ kernels, else bf16 on torch's int4 kernel
    assert fast.dtype == quantized_activations("cpu")
    assert rel_err(fast.logits(IDS), reference_logits(llama)) < 5e-2


def _hf_name(gguf_name: str) -> str:
    table = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    parts = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    stem = gguf_name.rsplit(".", 1)[0]
    if stem in table:
        return table[stem] + ".weight"
    _, i, part = stem.split(".")
    return f"model.layers.{i}.{parts[part]}.weight"


def write_glm_gguf(path, glm):
    """A llama.cpp-style `chatglm` GGUF (fused attn_qkv with bias, fused ffn_up) from a tiny GLM."""
    c = glm.config
    w = gguf_with_shape(path, "chatglm", c, c.head_dim // 2)
    names = {"transformer.embedding.word_embeddings.weight": "token_embd.weight",
             "transformer.encoder.final_layernorm.weight": "output_norm.weight",
             "transformer.output_layer.weight": "output.weight"}
    parts = {"input_layernorm.weight": "attn_norm.weight", "self_attention.query_key_value.weight": "attn_qkv.weight",
             "self_attention.query_key_value.bias": "attn_qkv.bias", "self_attention.dense.weight": "attn_output.weight",
             "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.dense_h_to_4h.weight": "ffn_up.weight",
             "mlp.dense_4h_to_h.weight": "ffn_down.weight"}
    for name, t in thudm_state_dict(glm).items():
        if name not in names:
            _, _, _, i, rest = name.split(".", 4)
            names[name] = f"blk.{i}.{parts[rest]}"
        w.add_tensor(names[name], t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_chatglm_gguf_matches_transformers(tmp_path):
    glm = tiny_glm()
    ours = load_model(write_glm_gguf(tmp_path / "glm.gguf", glm))
    assert ours.config.arch == "chatglm2" and ours.config.num_kv_heads == 2
    assert rel_err(ours.logits(IDS), reference_logits(glm)) < 1e-4


def test_rope_ratio_of_chatglm3_32k(tmp_path):
    """ChatGLM3-6B-32k and GLM-4 scale the rotary base by rope_ratio; transformers names it rope_theta."""
    glm = tiny_glm()
    glm.config.rope_parameters["rope_theta"] = 500000.0
    glm.model.rotary_emb.__init__(glm.config)
    thudm = write_folder(tmp_path, thudm_config(glm, rope_ratio=50, original_rope=True), thudm_state_dict(glm))
    ours = load_model(thudm, dtype="f32")
    assert ours.config.rope_theta == 500000.0
    assert rel_err(ours.logits(IDS), reference_logits(glm)) < 1e-4


GLM_SIZES = [(5, 32), (32,), (32,), (96, 32), (96,), (32, 32), (32,), (32,), (32,), (128, 32), (128,), (32, 128), (32,),
             (32,), (32,)]
GLM_NAMES = ["transformer.word_embeddings.weight"] + [
    "transformer.layers.0." + n for n in (
        "input_layernorm.weight", "input_layernorm.bias", "attention.query_key_value.weight",
        "attention.query_key_value.bias", "attention.dense.weight", "attention.dense.bias",
        "post_attention_layernorm.weight", "post_attention_layernorm.bias", "mlp.dense_h_to_4h.weight",
        "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias")
] + ["transformer.final_layernorm.weight", "transformer.final_layernorm.bias"]


GLM_CONFIG = {"model_type": "chatglm", "position_encoding_2d": True, "num_layers": 1, "hidden_size": 32,
              "num_attention_heads": 8, "inner_hidden_size": 128, "vocab_size": 5, "layernorm_epsilon": 1e-5,
              "max_sequence_length": 16, "gmask_token_id": 1, "mask_token_id": 99, "bos_token_id": 2,
              "eos_token_id": 4, "torch_dtype": "float32"}


def test_chatglm6b_matches_official_code(shared_dir, tmp_path):
    """GLM v1: 2D positions, two-way context up to <sop>, alpha residuals, tied head; prefill and decode."""
    weights, steps = read_oracle("glm_model.data", GLM_SIZES)
    state = dict(zip(GLM_NAMES, weights))
    model = load_model(write_folder(tmp_path / "glm", GLM_CONFIG, state), dtype="f32")
    expected = torch.cat([h for _, h in steps]) @ weights[0].T
    assert rel_err(model.logits([0, 1, 2, 3, 4]), expected) < 1e-4
    assert rel_err(steps_logits(model, [ids for ids, _ in steps]), expected) < 1e-4


def alibi_reference(state: dict, ids: list[int], heads: int, eps: float) -> torch.Tensor:
    """Baichuan-13B written from the ALiBi paper: scores q.k/sqrt(d) + slope_h * key position, causal."""
    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def slopes(n):  # 2^(-8(h+1)/n) for powers of two; otherwise that set for 2^floor(log2 n) + every other of 2x
        p = 2 ** int(np.floor(np.log2(n)))
        s = [2 ** (-8 * (h + 1) / p) for h in range(p)]
        return s + [2 ** (-8 * (h + 1) / (2 * p)) for h in range(2 * p)][0::2][: n - p]

    x = state["model.embed_tokens.weight"][ids]
    T, hidden = x.shape
    d = hidden // heads
    bias = torch.tensor(slopes(heads))[:, None, None] * torch.arange(T)[None, None, :].float()
    causal = torch.ones(T, T).tril().bool()
    layers = len({k.split(".")[2] for k in state if k.startswith("model.layers.")})
    for i in range(layers):
        p = f"model.layers.{i}."
        h = rms(x, state[p + "input_layernorm.weight"])
        q, k, v = (h @ state[p + "self_attn.W_pack.weight"].T).view(T, 3, heads, d).unbind(1)
        scores = torch.einsum("thd,shd->hts", q, k) / d ** 0.5 + bias
        att = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
        x = x + torch.einsum("hts,shd->thd", att, v).reshape(T, hidden) @ state[p + "self_attn.o_proj.weight"].T
        h = rms(x, state[p + "post_attention_layernorm.weight"])
        g, u = h @ state[p + "mlp.gate_proj.weight"].T, h @ state[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ state[p + "mlp.down_proj.weight"].T
    return rms(x, state["model.norm.weight"]) @ state["lm_head.weight"].T


def baichuan_state(vocab: int, hidden: int, layers: int, ffn: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * shape[-1] ** -0.5  # noqa: E731
    state = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g), "lm_head.weight": r(vocab, hidden),
             "model.norm.weight": torch.rand(hidden, generator=g) + 0.5}
    for i in range(layers):
        p = f"model.layers.{i}."
        state.update({p + "input_layernorm.weight": torch.rand(hidden, generator=g) + 0.5,
                      p + "post_attention_layernorm.weight": torch.rand(hidden, generator=g) + 0.5,
                      p + "self_attn.W_pack.weight": r(3 * hidden, hidden), p + "self_attn.o_proj.weight": r(hidden, hidden),
                      p + "mlp.gate_proj.weight": r(ffn, hidden), p + "mlp.up_proj.weight": r(ffn, hidden),
                      p + "mlp.down_proj.weight": r(hidden, ffn)})
    return state


@pytest.mark.parametrize("heads", [6, 8])
def test_baichuan13b_alibi_matches_the_paper(tmp_path, heads):
    state = baichuan_state(vocab=96, hidden=heads * 8, layers=2, ffn=64, seed=heads)
    cfg = {"model_type": "baichuan", "hidden_size": heads * 8, "intermediate_size": 64, "num_attention_heads": heads,
           "num_hidden_layers": 2, "rms_norm_eps": 1e-6, "vocab_size": 96, "model_max_length": 64,
           "torch_dtype": "float32"}
    model = load_model(write_folder(tmp_path, cfg, state), dtype="f32")
    expected = alibi_reference(state, IDS, heads, 1e-6)
    assert rel_err(model.logits(IDS), expected) < 1e-4
    assert rel_err(steps_logits(model, [IDS[:5]] + [[i] for i in IDS[5:]]), expected) < 1e-4


def test_baichuan2_normalises_head_rows(tmp_path):
    """Baichuan2 (its 125696-token vocabulary) divides each lm_head row by its norm; Baichuan-7B does not."""
    state = baichuan_state(vocab=125696, hidden=16, layers=1, ffn=32, seed=3)
    cfg = {"model_type": "baichuan", "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
           "num_hidden_layers": 1, "rms_norm_eps": 1e-6, "vocab_size": 125696, "max_position_embeddings": 64}
    model = load_model(write_folder(tmp_path, cfg, state), dtype="f32")
    from transformers import LlamaConfig, LlamaForCausalLM

    ref = LlamaForCausalLM(LlamaConfig(vocab_size=125696, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                       num_hidden_layers=1, rms_norm_eps=1e-6, max_position_embeddings=64)).eval()
    sd = {k.replace("W_pack", "q_proj"): v for k, v in state.items()}
    W = state["model.layers.0.self_attn.W_pack.weight"]
    sd.update({"model.layers.0.self_attn.q_proj.weight": W[:16], "model.layers.0.self_attn.k_proj.weight": W[16:32],
               "model.layers.0.self_attn.v_proj.weight": W[32:],
               "lm_head.weight": torch.nn.functional.normalize(state["lm_head.weight"], dim=-1)})
    ref.load_state_dict(sd)
    assert rel_err(model.logits(IDS), reference_logits(ref)) < 1e-4


@pytest.mark.parametrize("bits", [8, 4])
def test_thudm_quantized_folder(tmp_path, bits):
    """THUDM int8/int4 folders (`weight` + per-row `weight_scale`, int4 packed high nibble first) load exactly."""
    glm = tiny_glm()
    state = thudm_state_dict(glm)
    qmax = 127 if bits == 8 else 7
    with torch.no_grad():
        for name in list(state):
            if name.startswith("transformer.encoder.layers.") and name.endswith(".weight") and state[name].dim() == 2:
                w = state[name]
                scale = (w.abs().amax(dim=1) / qmax).half()
                q = torch.clamp(torch.round(w / scale.float()[:, None]), -qmax - 1, qmax).to(torch.int8)
                state[name + "_scale"] = scale
                if bits == 4:
                    packed = ((q[:, 0::2].to(torch.int16) << 4) | (q[:, 1::2].to(torch.int16) & 0xF)).to(torch.uint8)
                    state[name] = packed.view(torch.int8)
                else:
                    state[name] = q
                glm_name = _glm_name(name, glm)  # the reference holds the dequantized values
                deq = q.float() * scale.float()[:, None]
                _assign(glm, glm_name, deq)
    write_folder(tmp_path, thudm_config(glm, quantization_bit=bits), state)
    ours = load_model(tmp_path, dtype="f32")
    assert rel_err(ours.logits(IDS), reference_logits(glm)) < 1e-4


def _glm_name(thudm: str, glm) -> list[str]:
    i = thudm.split(".")[3]
    part = thudm.split(".", 4)[4]
    return {"self_attention.query_key_value.weight": [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkv"],
            "self_attention.dense.weight": [f"model.layers.{i}.self_attn.o_proj.weight"],
            "mlp.dense_h_to_4h.weight": [f"model.layers.{i}.mlp.gate_up_proj.weight"],
            "mlp.dense_4h_to_h.weight": [f"model.layers.{i}.mlp.down_proj.weight"]}[part]


def _assign(glm, names: list[str], value: torch.Tensor) -> None:
    sd = glm.state_dict()
    start = 0
    for n in names:
        rows = sd[n].shape[0]
        sd[n].copy_(value[start : start + rows])
        start += rows


def test_baichuan13b_gguf_uses_alibi(tmp_path):
    """llama.cpp's `baichuan` files of 40 layers are Baichuan-13B: ALiBi, no rotary."""
    import gguf

    heads, hidden, layers = 4, 32, 40
    state = baichuan_state(vocab=96, hidden=hidden, layers=layers, ffn=64, seed=9)
    w = gguf.GGUFWriter(str(tmp_path / "b13.gguf"), "baichuan")
    for method, value in (("add_block_count", layers), ("add_context_length", 64), ("add_embedding_length", hidden),
                          ("add_feed_forward_length", 64), ("add_head_count", heads), ("add_head_count_kv", heads),
                          ("add_layer_norm_rms_eps", 1e-6)):
        getattr(w, method)(value)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in state.items():
        if "W_pack" in name:
            i = name.split(".")[2]
            for part, rows in zip("qkv", t.split(hidden)):
                w.add_tensor(f"blk.{i}.attn_{part}.weight", rows.contiguous().numpy())
            continue
        if name not in names:
            _, _, i, rest = name.split(".", 3)
            names[name] = f"blk.{i}.{parts[rest.rsplit('.', 1)[0]]}.weight"
        w.add_tensor(names[name], t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = load_model(tmp_path / "b13.gguf", dtype="f32")
    assert ours.config.extra["alibi"]
    assert rel_err(ours.logits(IDS), alibi_reference(state, IDS, heads, 1e-6)) < 1e-4


def glm_reference(w: dict, ids: list[int], prefix: torch.Tensor | None, ctx: int, gmask_pos: int) -> torch.Tensor:
    """ChatGLM-6B written from the rules in shared/oracles/README.md, with an optional P-Tuning v2
    prefix [2 (key, value), pre_seq_len, heads, head_dim] that every real token sees, unrotated."""
    import math

    import torch.nn.functional as F

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"], 1e-5)

    def rotate(x, positions):  # halves rotation, base 10000, over x's last dim
        half = x.shape[-1] // 2
        inv = 1.0 / 10000 ** (torch.arange(0, half, dtype=torch.float32) * 2 / x.shape[-1])
        ang = positions[:, None].float() * inv
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]
        return torch.cat([x[..., :half] * cos - x[..., half:] * sin, x[..., half:] * cos + x[..., :half] * sin], -1)

    T, H = len(ids), 8
    pos = torch.tensor([i if i < ctx else gmask_pos for i in range(T)])
    block = torch.tensor([0 if i < ctx else i - ctx + 1 for i in range(T)])
    x = w["transformer.word_embeddings.weight"][ids]
    h = ln(x, "transformer.layers.0.input_layernorm")
    qkv = (h @ w["transformer.layers.0.attention.query_key_value.weight"].T
           + w["transformer.layers.0.attention.query_key_value.bias"]).view(T, H, 12)
    q, k, v = qkv.split(4, dim=-1)
    q = torch.cat([rotate(q[..., :2], pos), rotate(q[..., 2:], block)], -1)
    k = torch.cat([rotate(k[..., :2], pos), rotate(k[..., 2:], block)], -1)
    P = 0 if prefix is None else prefix.shape[1]
    if prefix is not None:
        k, v = torch.cat([prefix[0], k]), torch.cat([prefix[1], v])
    scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(4)
    i, j = torch.arange(T)[:, None], torch.arange(P + T)[None] - P
    visible = (j < 0) | (j <= i) | (j < ctx)
    att = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
    out = torch.einsum("hts,shd->thd", att, v).reshape(T, 32)
    out = out @ w["transformer.layers.0.attention.dense.weight"].T + w["transformer.layers.0.attention.dense.bias"]
    x = h * math.sqrt(56) + out
    h = ln(x, "transformer.layers.0.post_attention_layernorm")
    mlp = F.gelu(h @ w["transformer.layers.0.mlp.dense_h_to_4h.weight"].T + w["transformer.layers.0.mlp.dense_h_to_4h.bias"],
                 approximate="tanh")
    x = h * math.sqrt(56) + mlp @ w["transformer.layers.0.mlp.dense_4h_to_h.weight"].T \
        + w["transformer.layers.0.mlp.dense_4h_to_h.bias"]
    return ln(x, "transformer.final_layernorm") @ w["transformer.word_embeddings.weight"].T


def test_chatglm6b_ptuning_v2(shared_dir, tmp_path):
    """ChatGLM-6B's P-Tuning v2: the prefix rows hold every head's keys/values; positions and the
    two-way context are as without a prefix. The reference without a prefix is checked first against
    the official vectors, so it speaks for the official code."""
    weights, steps = read_oracle("glm_model.data", GLM_SIZES)
    state = dict(zip(GLM_NAMES, weights))
    plain = glm_reference(state, [0, 1, 2, 3, 4], None, ctx=2, gmask_pos=1)
    assert rel_err(plain, torch.cat([h for _, h in steps]) @ weights[0].T) < 1e-4
    g = torch.Generator().manual_seed(6)
    embedding = torch.randn(3, 1 * 2 * 8 * 4, generator=g)  # pre_seq_len 3, layers*2*heads*head_dim
    prefix = embedding.view(3, 2, 8, 4).permute(1, 0, 2, 3)  # [key/value, pre, heads, head_dim]
    state["transformer.prefix_encoder.embedding.weight"] = embedding
    model = load_model(write_folder(tmp_path, dict(GLM_CONFIG, pre_seq_len=3, prefix_projection=False), state),
                       dtype="f32")
    expected = glm_reference(state, [0, 1, 2, 3, 4], prefix, ctx=2, gmask_pos=1)
    assert rel_err(model.logits([0, 1, 2, 3, 4]), expected) < 1e-4
    assert rel_err(steps_logits(model, [[0, 1, 2], [3], [4]]), expected) < 1e-4
    assert rel_err(expected, plain) > 1e-3  # the prefix mattered


@pytest.mark.parametrize("ids, mask_pos", [
    ([0, 1, 3, 2, 3, 4], 1),  # [MASK] typed after [gMASK] and generated after <sop>: the first [gMASK] counts
    ([0, 3, 0, 2, 3, 4], 1),  # no [gMASK]: the first [MASK]
    ([0, 3, 1, 2, 3, 4], 2),  # a [gMASK] after a [MASK] still wins
])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_chatglm6b_mask_position_is_the_official_one(shared_dir, tmp_path, ids, mask_pos, with_prefix):
    """The official code's `gMASK if gMASK in seq else MASK; seq.index(mask_token)`: the first [gMASK], else
    the first [MASK], in prefill, in cached decode (the seq so far) and with a P-Tuning v2 prefix. Here id 3 is
    [MASK]; the reference is the one checked against the oracle vectors above."""
    weights, _ = read_oracle("glm_model.data", GLM_SIZES)
    state = dict(zip(GLM_NAMES, weights))
    cfg, prefix = dict(GLM_CONFIG, mask_token_id=3), None
    if with_prefix:
        embedding = torch.randn(3, 2 * 8 * 4, generator=torch.Generator().manual_seed(7))
        state["transformer.prefix_encoder.embedding.weight"] = embedding
        prefix = embedding.view(3, 2, 8, 4).permute(1, 0, 2, 3)
        cfg.update(pre_seq_len=3, prefix_projection=False)
    model = load_model(write_folder(tmp_path, cfg, state), dtype="f32")
    expected = glm_reference(state, ids, prefix, ctx=ids.index(2), gmask_pos=mask_pos)
    assert rel_err(model.logits(ids), expected) < 1e-4
    assert rel_err(steps_logits(model, [ids[:4], ids[4:5], ids[5:]]), expected) < 1e-4
    last_mark = max(k for k, t in enumerate(ids[:4]) if t in (1, 3))  # the rule this replaces
    if last_mark != mask_pos:
        wrong = glm_reference(state, ids, prefix, ctx=ids.index(2), gmask_pos=last_mark)
        assert rel_err(wrong, expected) > 1e-3  # the sequence tells the two rules apart
