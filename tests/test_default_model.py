"""The real default model (SmolLM2-135M-Instruct Q4_1) against llama.cpp and exact float32 arithmetic."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from chatglm import load_model
from chatglm.engine import SamplingParams, generate

LICENSE = Path("/usr/share/common-licenses/GPL-3")
N_TOKENS = 512


@pytest.fixture(scope="module")
def ours(default_gguf):
    return load_model(default_gguf)


@pytest.fixture(scope="module")
def llama(default_gguf, llama_cpp):
    return llama_cpp.Llama(model_path=str(default_gguf), n_ctx=N_TOKENS + 16, logits_all=True, verbose=False,
                           n_threads=2, n_batch=N_TOKENS)


@pytest.fixture(scope="module")
def text_tokens(llama):
    if not LICENSE.is_file():
        pytest.skip(f"{LICENSE} is absent")
    tokens = llama.tokenize(LICENSE.read_text()[:6000].encode(), add_bos=False, special=False)
    assert len(tokens) >= N_TOKENS
    return tokens[:N_TOKENS]


def nll(logits: np.ndarray, tokens: list[int]) -> float:
    """Mean negative log-likelihood of tokens[1:] given the logits at the positions before them."""
    x = torch.from_numpy(np.asarray(logits[:-1], np.float64))
    return float(torch.nn.functional.cross_entropy(x, torch.tensor(tokens[1:])))


def test_agrees_with_llama_cpp(ours, llama, text_tokens):
    llama.reset()
    llama.eval(text_tokens)
    theirs = np.asarray(llama.scores[:N_TOKENS], np.float32)
    mine = ours.logits(text_tokens)
    agreement = float(np.mean(mine.argmax(-1) == theirs.argmax(-1)))
    assert agreement >= 0.95, f"top-1 agreement with llama.cpp {agreement:.3f}"
    ppl_ours, ppl_theirs = np.exp(nll(mine, text_tokens)), np.exp(nll(theirs, text_tokens))
    assert abs(ppl_ours / ppl_theirs - 1) < 0.02, f"perplexity {ppl_ours:.3f} vs llama.cpp {ppl_theirs:.3f}"


def float32_reference(path: Path):
    """transformers' LlamaForCausalLM holding the file's weights, dequantized exactly to float32."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    reader = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("tokenizer.")}
    heads, kv = f["llama.attention.head_count"], f["llama.attention.head_count_kv"]
    cfg = LlamaConfig(vocab_size=49152, hidden_size=f["llama.embedding_length"],
                      intermediate_size=f["llama.feed_forward_length"], num_hidden_layers=f["llama.block_count"],
                      num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=f["llama.attention.layer_norm_rms_epsilon"],
                      rope_theta=f["llama.rope.freq_base"], max_position_embeddings=2048, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    parts = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    sd = model.state_dict()
    for t in reader.tensors:
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        stem = t.name.rsplit(".", 1)[0]
        if stem == "token_embd":
            name = "model.embed_tokens.weight"
        elif stem == "output_norm":
            name = "model.norm.weight"
        else:
            _, i, part = stem.split(".")
            name = f"model.layers.{i}.{parts[part]}.weight"
            n = {"attn_q": heads, "attn_k": kv}.get(part)
            if n:  # undo llama.cpp's interleaving of q/k rows
                w = w.reshape(n, w.shape[0] // n // 2, 2, -1).transpose(1, 2).reshape(w.shape)
        sd[name].copy_(w.reshape(sd[name].shape))
    model.tie_weights()
    return model


def test_greedy_text_matches_exact_float32(default_gguf, llama):
    """With float32 activations our arithmetic is exact up to summation order, so greedy text must match."""
    ours = load_model(default_gguf, dtype="f32")
    prompt = llama.tokenize(b"<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
                            add_bos=False, special=True)
    reference = float32_reference(default_gguf)
    with torch.no_grad():
        ref = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                 pad_token_id=2)[0, len(prompt):].tolist()
    mine = list(generate(ours, prompt, SamplingParams(do_sample=False, max_new_tokens=24)))
    assert mine == ref
