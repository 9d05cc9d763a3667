"""Tiny random checkpoints the tests build for themselves: HF folders in every naming, GGUF files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


def tiny_glm(layers: int = 3, heads: int = 8, kv_heads: int = 2, head_dim: int = 8, vocab: int = 96,
             seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random transformers GlmForCausalLM (the live reference for ChatGLM2/3 and GLM-4)."""
    from transformers import GlmConfig, GlmForCausalLM

    torch.manual_seed(seed)
    cfg = GlmConfig(vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=96, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                    max_position_embeddings=128, rms_norm_eps=1e-5, pad_token_id=0, eos_token_id=[1],
                    attention_bias=True)
    model = GlmForCausalLM(cfg).eval()
    _randomize(model)
    return model.to(dtype)


def tiny_llama(layers: int = 3, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, vocab: int = 96,
               tie: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32, bias: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=96,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                      rope_theta=10000.0, attention_bias=bias, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    _randomize(model)
    if tie:
        model.tie_weights()
    return model.to(dtype)


def _randomize(model: torch.nn.Module) -> None:
    """Default init leaves norms at 1 and biases at 0; draw everything so each weight matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, p.shape[-1] ** -0.5) if p.dim() > 1 else p.uniform_(0.5, 1.5)


def thudm_state_dict(glm) -> dict[str, torch.Tensor]:
    """The same weights under THUDM's modeling_chatglm.py names (fused query_key_value)."""
    sd = glm.state_dict()
    out = {
        "transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
        "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
        "transformer.output_layer.weight": sd["lm_head.weight"],
    }
    for i in range(glm.config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        a = src + "self_attn."
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "self_attention.query_key_value.weight"] = torch.cat([sd[a + p + "_proj.weight"] for p in "qkv"])
        out[dst + "self_attention.query_key_value.bias"] = torch.cat([sd[a + p + "_proj.bias"] for p in "qkv"])
        out[dst + "self_attention.dense.weight"] = sd[a + "o_proj.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "post_attention_layernorm.weight"]
        out[dst + "mlp.dense_h_to_4h.weight"] = sd[src + "mlp.gate_up_proj.weight"]
        out[dst + "mlp.dense_4h_to_h.weight"] = sd[src + "mlp.down_proj.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def thudm_config(glm, **extra) -> dict:
    c = glm.config
    cfg = {
        "model_type": "chatglm", "architectures": ["ChatGLMModel"], "_name_or_path": "THUDM/chatglm3-6b",
        "num_layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
        "multi_query_attention": True, "multi_query_group_num": c.num_key_value_heads, "kv_channels": c.head_dim,
        "ffn_hidden_size": c.intermediate_size, "padded_vocab_size": c.vocab_size, "layernorm_epsilon": c.rms_norm_eps,
        "add_qkv_bias": True, "add_bias_linear": False, "rmsnorm": True, "seq_length": 128, "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    cfg.update(extra)
    return cfg


def write_folder(folder: Path, config: dict, state: dict[str, torch.Tensor], fmt: str = "safetensors",
                 shards: int = 1) -> Path:
    """An HF folder: config.json plus one file or `shards` files with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    names = list(state)
    groups = [names[i::shards] for i in range(shards)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for k, group in enumerate(groups):
        fname = f"{stem}.{ext}" if shards == 1 else f"{stem}-{k + 1:05d}-of-{shards:05d}.{ext}"
        part = {n: state[n].contiguous() for n in group}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(part, str(folder / fname))
        else:
            torch.save(part, folder / fname)
        weight_map.update({n: fname for n in group})
    if shards > 1:
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def read_oracle(name: str, sizes: list[tuple[int, ...]], skip: int = 0):
    """Split an oracle file into its weights (in README order) and its three (ids, hidden) steps."""
    raw = (SHARED / "oracles" / name).read_bytes()
    offset, weights = skip, []
    for shape in sizes:
        n = int(np.prod(shape))
        weights.append(torch.from_numpy(np.frombuffer(raw, np.float32, n, offset).reshape(shape).copy()))
        offset += 4 * n
    steps = []
    for count in (3, 1, 1):
        ids = np.frombuffer(raw, np.int32, count, offset).tolist()
        offset += 4 * count
        hidden = np.frombuffer(raw, np.float32, count * 32, offset).reshape(count, 32)
        offset += 4 * count * 32
        steps.append((ids, torch.from_numpy(hidden.copy())))
    assert offset == len(raw), f"{name}: {len(raw) - offset} bytes left over; layout misread"
    return weights, steps


def permute_for_gguf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter reorders q/k rows of each head from halves to interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tiny_glm4(layers: int = 2, seed: int = 0, vocab: int = 96):
    """A random transformers Glm4ForCausalLM (GLM-4-0414 / GLM-Z1): post norms, partial interleaved rotary."""
    from transformers import Glm4Config, Glm4ForCausalLM

    torch.manual_seed(seed)
    cfg = Glm4Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                     rms_norm_eps=1e-5, attention_bias=True, pad_token_id=0, eos_token_id=[1, 2])
    model = Glm4ForCausalLM(cfg).eval()
    _randomize(model)
    return model


_MOE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
            num_experts_per_tok=3, n_shared_experts=1, routed_scaling_factor=1.5, max_position_embeddings=128,
            rms_norm_eps=1e-5, norm_topk_prob=True, eos_token_id=1)


def tiny_glm4_moe(layers: int = 3, seed: int = 0, **overrides):
    """A random transformers Glm4MoeForCausalLM (GLM-4.5/4.6): QK norm, grouped routing, one dense layer."""
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    torch.manual_seed(seed)
    settings = dict(_MOE, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                    n_group=2, topk_group=1, first_k_dense_replace=1, use_qk_norm=True, attention_bias=True)
    cfg = Glm4MoeConfig(**{**settings, **overrides})
    model = Glm4MoeForCausalLM(cfg).eval()
    _randomize_moe(model)
    return model


def tiny_glm4_moe_lite(layers: int = 3, seed: int = 0, **overrides):
    """A random transformers Glm4MoeLiteForCausalLM (GLM-4.7-Flash): latent attention and experts."""
    from transformers import Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM

    torch.manual_seed(seed)
    settings = dict(_MOE, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
                    q_lora_rank=64, qk_rope_head_dim=8, qk_nope_head_dim=24, v_head_dim=16)
    cfg = Glm4MoeLiteConfig(**{**settings, **overrides})
    model = Glm4MoeLiteForCausalLM(cfg).eval()
    _randomize_moe(model)
    return model


GLM_SPECIALS = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>",
                "<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
                "</arg_value>"]


def write_glm_tokenizer(folder: Path, chat_template: str) -> int:
    """A GLM-4.5-style tokenizer.json (byte-level BPE trained here behind GLM-4's split pattern, the chat and tag
    tokens added as special, as GLM folders add them), the chat template beside it and the folder's stops; returns
    the vocabulary's size."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from chatglm.tokenizers import GLM4_PATTERN

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GLM4_PATTERN), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = ["The user wants the weather of a city. Let me look it up. It is sunny in Oslo, 21 degrees.",
              "get_weather city days units Oslo Rome Paris tool_response Tools function name key value"]
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, special=True) for t in GLM_SPECIALS])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "chat_template.jinja").write_text(chat_template)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    vocab = tok.get_vocab()
    stops = [vocab[t] for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}))
    return tok.get_vocab_size()


def _randomize_moe(model: torch.nn.Module) -> None:
    """Random weights, and a random routing correction bias (a buffer, zero by default)."""
    _randomize(model)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.3, 0.3)


GLM_V1_LAYER = ("input_layernorm.weight", "input_layernorm.bias", "attention.query_key_value.weight",
                "attention.query_key_value.bias", "attention.dense.weight", "attention.dense.bias",
                "post_attention_layernorm.weight", "post_attention_layernorm.bias", "mlp.dense_h_to_4h.weight",
                "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias")


def tiny_glm_v1(folder: Path, layers: int = 2, hidden: int = 64, heads: int = 4, ffn: int = 128, vocab: int = 20,
                seed: int = 0, **config) -> Path:
    """A random ChatGLM-6B (GLM v1) folder under THUDM's names: [gMASK] is id 1, <sop> id 2, [MASK] id 3."""
    shapes = {"transformer.word_embeddings.weight": (vocab, hidden), "transformer.final_layernorm.weight": (hidden,),
              "transformer.final_layernorm.bias": (hidden,)}
    for i in range(layers):
        sizes = ((hidden,), (hidden,), (3 * hidden, hidden), (3 * hidden,), (hidden, hidden), (hidden,), (hidden,),
                 (hidden,), (ffn, hidden), (ffn,), (hidden, ffn), (hidden,))
        shapes.update({f"transformer.layers.{i}.{n}": s for n, s in zip(GLM_V1_LAYER, sizes)})
    g = torch.Generator().manual_seed(seed)
    state = {n: (torch.randn(*s, generator=g) * s[-1] ** -0.5 if len(s) == 2 else 0.5 + torch.rand(*s, generator=g))
             for n, s in shapes.items()}
    cfg = {"model_type": "chatglm", "position_encoding_2d": True, "num_layers": layers, "hidden_size": hidden,
           "num_attention_heads": heads, "inner_hidden_size": ffn, "vocab_size": vocab, "layernorm_epsilon": 1e-5,
           "max_sequence_length": 64, "gmask_token_id": 1, "mask_token_id": 3, "bos_token_id": 2, "eos_token_id": 4,
           "torch_dtype": "float32", **config}
    return write_folder(folder, cfg, state)
