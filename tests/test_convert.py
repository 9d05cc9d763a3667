"""`chatglm convert`: GGUF files llama.cpp reads (llama-cpp-python as the peer), chatglm.cpp GGML files,
bit-exact ggml blocks, LoRA merged at conversion, no partial output, runtime quantization of HF folders."""
from __future__ import annotations

import argparse
import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from chatglm import load_model
from chatglm.convert import add_parser, convert, quantized_weights
from chatglm.loaders import build_model, open_checkpoint
from chatglm.loaders.ggml import read_ggml
from chatglm.messages import ChatMessage
from chatglm.models.layers import Decoder
from chatglm.quant import QTensor, quantize
from chatglm.tokenizers import load_tokenizer

from checkpoints import permute_for_gguf, thudm_config, thudm_state_dict, tiny_glm, tiny_llama, write_folder
from test_models import IDS, reference_logits, rel_err

CORPUS = ("The quick brown fox jumps over the lazy dog. Models run locally, fast, on the CPU. "
          "def main():\n    return 42\n\n1234 5678 3.14159 I've you're don't 'LL  spaces\ttabs\n")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEXTS = ["Hello world, the lazy dog runs fast!", "  def f(x):\n\treturn 1234\n\n", "你好，世界！我是人工智能助手。",
         "mixed 3.14159 I've  two  spaces"]
CHAT = [ChatMessage("system", "You are helpful."), ChatMessage("user", "你好 there"),
        ChatMessage("assistant", "Hi! How can I help?"), ChatMessage("user", "Tell me\na joke")]
LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TOLERANCE = {Q.F32: 1e-5, Q.F16: 5e-3, Q.BF16: 6e-2, Q.Q8_0: 6e-2, Q.Q5_0: 0.3, Q.Q5_1: 0.3, Q.Q4_0: 0.6, Q.Q4_1: 0.6}


def greedy_agrees(expected: np.ndarray, got: np.ndarray) -> bool:
    """Each row's argmax in `got` is the top of `expected`, or within the two results' difference of it."""
    slack = 2 * np.abs(expected - got).max()
    picked = expected[np.arange(len(got)), got.argmax(-1)]
    return bool(np.all(picked >= expected.max(-1) - slack))


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def write_bpe_tokenizer(folder) -> int:
    """A byte-level BPE tokenizer.json trained here, with ChatML specials; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": CHATML}))
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    vocab = write_bpe_tokenizer(folder)
    model = tiny_llama(vocab=vocab)
    model.save_pretrained(folder)
    return folder, model


def glm_folder(folder, shared_dir, vocab: int, name: str, tokenizer: str, layers: int = 2, **extra):
    glm = tiny_glm(vocab=vocab, layers=layers)
    state = thudm_state_dict(glm)
    state.update(extra.pop("state", {}))
    write_folder(folder, thudm_config(glm, _name_or_path=name, **extra), state)
    shutil.copy(shared_dir / "tokenizers" / tokenizer, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def glm3_dir(tmp_path_factory, shared_dir):
    return glm_folder(tmp_path_factory.mktemp("glm3"), shared_dir, 65024, "THUDM/chatglm3-6b",
                      "chatglm3-6b/tokenizer.model")


# ----- llama family -----

@pytest.mark.parametrize("qtype", [Q.F32, Q.F16], ids=lambda q: q.name)
def test_llama_gguf_agrees_with_llama_cpp(tmp_path, llama_dir, llama_cpp, qtype):
    folder, model = llama_dir
    out = convert(folder, tmp_path / "m.gguf", qtype.name.lower(), progress=False)
    ckpt = open_checkpoint(out)
    ours = build_model(ckpt)
    assert rel_err(ours.logits(IDS), reference_logits(model)) < TOLERANCE[qtype]
    source, tok = load_tokenizer(folder), ckpt.load_tokenizer()
    llm = llama_cpp.Llama(str(out), logits_all=True, verbose=False, n_ctx=128, flash_attn=False)
    for text in TEXTS:
        ids = source.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids == tok.encode(text)
        assert greedy_agrees(ours.logits(ids), llama_cpp_logits(llm, ids))
    assert tok.encode_chat(CHAT) == source.encode_chat(CHAT)
    llm.close()


def test_llama_sentencepiece_folder_in_llama_cpp(tmp_path, llama_cpp):
    """A folder with only a SentencePiece tokenizer.model (Baichuan, InternLM) keeps its pieces, scores and bos."""
    import io

    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter((CORPUS * 8).splitlines()), model_writer=proto,
                                   vocab_size=320, model_type="bpe", byte_fallback=True, hard_vocab_limit=False,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(proto.getvalue())
    source = load_tokenizer(tmp_path / "tokenizer.model", family="llama")
    tiny_llama(vocab=source.vocab_size + 3).save_pretrained(tmp_path)  # padded rows
    out = convert(tmp_path, tmp_path / "m.gguf", "f16", progress=False)
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == source.encode(text, add_special_tokens=True)
    llm.close()


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.F16, Q.BF16, Q.F32], ids=lambda q: q.name)
def test_gguf_tensors_are_ggml_bytes(tmp_path, llama_dir, qtype):
    """Every 2-D tensor is gguf.quants' bytes of the source (q and k in llama.cpp's row order); norms stay f32."""
    folder, model = llama_dir
    out = convert(folder, tmp_path / "m.gguf", qtype.name.lower(), progress=False)
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    sd, c = model.state_dict(), model.config
    expected = {"token_embd.weight": sd["model.embed_tokens.weight"], "output.weight": sd["lm_head.weight"],
                "output_norm.weight": sd["model.norm.weight"]}
    heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}
    for i in range(c.num_hidden_layers):
        for hf, gg in LLAMA_NAMES.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            expected[f"blk.{i}.{gg}.weight"] = permute_for_gguf(w, heads[gg]) if gg in heads else w
    assert set(tensors) == set(expected)
    for name, w in expected.items():
        want = qtype if w.dim() == 2 else Q.F32
        assert tensors[name].tensor_type == want, name
        assert np.asarray(tensors[name].data).tobytes() == gguf.quants.quantize(w.numpy(), want).tobytes(), name
    assert rel_err(load_model(out).logits(IDS), reference_logits(model)) < TOLERANCE[qtype]


def test_columns_off_the_block_size_stay_f16(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    model = tiny_llama(heads=3, kv_heads=3, head_dim=16, vocab=write_bpe_tokenizer(folder))  # hidden 48
    model.save_pretrained(folder)
    out = convert(folder, tmp_path / "m.gguf", "q4_0", progress=False)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == Q.F16 and types["blk.0.ffn_down.weight"] == Q.Q4_0  # 96 columns
    assert rel_err(load_model(out).logits(IDS), reference_logits(model)) < TOLERANCE[Q.Q4_0]


def test_gguf_source_keeps_its_blocks_and_vocabulary(tmp_path, llama_dir, llama_cpp):
    first = convert(llama_dir[0], tmp_path / "a.gguf", "q4_0", progress=False)
    out = convert(first, tmp_path / "b.gguf", "q4_0", progress=False)
    source, ours = gguf.GGUFReader(first), gguf.GGUFReader(out)
    before = {t.name: np.asarray(t.data).tobytes() for t in source.tensors}
    assert {t.name: np.asarray(t.data).tobytes() for t in ours.tensors} == before  # blocks copied as they are
    tokenizer = [k for k in source.fields if k.startswith("tokenizer.")]
    assert "tokenizer.chat_template" in tokenizer and "tokenizer.ggml.merges" in tokenizer
    assert all(ours.fields[k].contents() == source.fields[k].contents() for k in tokenizer)
    llm = llama_cpp.Llama(str(out), logits_all=True, verbose=False, n_ctx=64, flash_attn=False)
    ids = load_tokenizer(llama_dir[0]).encode(TEXTS[0])
    assert llm.tokenize(TEXTS[0].encode(), add_bos=False, special=False) == ids
    assert greedy_agrees(load_model(out).logits(ids), llama_cpp_logits(llm, ids))
    llm.close()


def test_lora_is_merged_at_conversion(tmp_path, llama_dir):
    peft = pytest.importorskip("peft", reason="peft is a test extra")
    folder, _ = llama_dir
    wrapped = peft.get_peft_model(tiny_llama(vocab=load_tokenizer(folder).vocab_size),
                                  peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    wrapped.save_pretrained(tmp_path / "lora")
    merged = wrapped.merge_and_unload()
    out = convert(folder, tmp_path / "m.gguf", "f32", lora=tmp_path / "lora", progress=False)
    assert rel_err(load_model(out).logits(IDS), reference_logits(merged)) < 1e-5


# ----- ChatGLM family in llama.cpp's chatglm architecture -----

def check_glm_gguf(folder, out, llama_cpp, tolerance: float) -> dict[str, str]:
    """Same tokens and chat prompt in llama.cpp, the source tokenizer and ours; same logits and greedy picks.
    Returns the file's metadata as llama.cpp read it."""
    ckpt = open_checkpoint(out)
    assert ckpt.family.GGUF_ARCHS == ("chatglm",)
    source, tok = load_tokenizer(folder), ckpt.load_tokenizer()
    reference, ours = load_model(folder, dtype="f32"), build_model(ckpt)
    llm = llama_cpp.Llama(str(out), logits_all=True, verbose=False, n_ctx=128, flash_attn=False)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == source.encode(text) == tok.encode(text)
    prompt = source.encode_chat(CHAT)
    assert tok.encode_chat(CHAT) == prompt and tok.eos_ids == source.eos_ids
    expected = reference.logits(prompt)
    assert rel_err(ours.logits(prompt), expected) < tolerance
    theirs = llama_cpp_logits(llm, prompt)
    assert rel_err(theirs, expected) < max(tolerance, 2e-3) and greedy_agrees(expected, theirs)
    meta = dict(llm.metadata)
    llm.close()
    return meta


def test_chatglm3_gguf_in_llama_cpp(tmp_path, glm3_dir, llama_cpp):
    out = convert(glm3_dir, tmp_path / "glm3.gguf", "f32", progress=False)
    meta = check_glm_gguf(glm3_dir, out, llama_cpp, 1e-5)
    assert meta["chatglm.rope.dimension_count"] == "4" and meta["chatglm.rope.freq_base"] == "10000.000000"
    assert meta["tokenizer.ggml.model"] == "llama" and "[gMASK]sop" in meta["tokenizer.chat_template"]


def test_glm4_gguf_in_llama_cpp(tmp_path, shared_dir, llama_cpp):
    folder = glm_folder(tmp_path / "glm4", shared_dir, 151552, "THUDM/glm-4-9b-chat", "glm-4-9b/tokenizer.model",
                        layers=1, rope_ratio=5)
    out = convert(folder, tmp_path / "glm4.gguf", "f16", progress=False)
    meta = check_glm_gguf(folder, out, llama_cpp, 5e-3)
    assert meta["tokenizer.ggml.pre"] == "chatglm-bpe" and meta["chatglm.rope.freq_base"] == "50000.000000"


def test_quantized_glm_round_trip(tmp_path, glm3_dir):
    """The fused qkv is gguf.quants' bytes of the source's query_key_value."""
    out = convert(glm3_dir, tmp_path / "m.gguf", "q5_0", progress=False)
    ckpt = open_checkpoint(out)
    source = open_checkpoint(glm3_dir).get("transformer.encoder.layers.0.self_attention.query_key_value.weight")
    assert ckpt.get("blk.0.attn_qkv.weight").raw.numpy().tobytes() == quantize(source.numpy(), "q5_0").tobytes()
    assert rel_err(build_model(ckpt).logits(IDS), load_model(glm3_dir, dtype="f32").logits(IDS)) < TOLERANCE[Q.Q5_0]


def test_thudm_int4_folder_keeps_its_blocks(tmp_path, shared_dir):
    """THUDM's int4 weights are q4_0 blocks already: converting to q4_0 copies them, nothing is re-rounded."""
    glm = tiny_glm(vocab=65024, layers=1)
    state = thudm_state_dict(glm)
    for name in [n for n in state if n.startswith("transformer.encoder.layers.") and state[n].dim() == 2]:
        w = state[name]
        scale = (w.abs().amax(dim=1) / 7).half()
        q = torch.clamp(torch.round(w / scale.float()[:, None]), -8, 7).to(torch.int16)
        state[name] = ((q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)).to(torch.uint8).view(torch.int8)  # high nibble first
        state[name + "_scale"] = scale
    write_folder(tmp_path / "int4", thudm_config(glm, quantization_bit=4), state)
    shutil.copy(shared_dir / "tokenizers" / "chatglm3-6b" / "tokenizer.model", tmp_path / "int4" / "tokenizer.model")
    out = convert(tmp_path / "int4", tmp_path / "m.bin", "q4_0", fmt="ggml", progress=False)
    ours, source = open_checkpoint(out), open_checkpoint(tmp_path / "int4")
    for name in [n for n in state if n.endswith("_scale")]:
        assert torch.equal(ours.get(name[:-6]).raw, source.get(name[:-6]).raw), name


# ----- chatglm.cpp GGML -----

@pytest.mark.parametrize("qtype,tol", [("f32", 1e-5), ("q8_0", 3e-2)])
def test_ggml_round_trip_chatglm3(tmp_path, glm3_dir, qtype, tol):
    out = convert(glm3_dir, tmp_path / "m.bin", qtype, fmt="ggml", progress=False)
    parsed = read_ggml(out)
    assert parsed.family == "chatglm3" and parsed.config["multi_query_group_num"] == 2
    assert parsed.tokenizer == (glm3_dir / "tokenizer.model").read_bytes()
    assert rel_err(load_model(out).logits(IDS), load_model(glm3_dir, dtype="f32").logits(IDS)) < tol


def glm1_folder(folder, shared_dir, hidden: int = 32, layers: int = 2):
    """A random ChatGLM-6B (GLM v1) folder with the real ice_text.model."""
    g = torch.Generator().manual_seed(0)
    vocab, ffn = 130528, 4 * hidden
    state = {"transformer.word_embeddings.weight": torch.randn(vocab, hidden, generator=g)}
    shapes = {"input_layernorm": (hidden,), "attention.query_key_value": (3 * hidden, hidden),
              "attention.dense": (hidden, hidden), "post_attention_layernorm": (hidden,),
              "mlp.dense_h_to_4h": (ffn, hidden), "mlp.dense_4h_to_h": (hidden, ffn)}
    for i in range(layers):
        for name, shape in shapes.items():
            p = f"transformer.layers.{i}.{name}."
            norm = len(shape) == 1
            state[p + "weight"] = torch.rand(shape, generator=g) + 0.5 if norm else \
                torch.randn(shape, generator=g) * shape[1] ** -0.5
            state[p + "bias"] = torch.randn(shape[0], generator=g) * 0.1
    state["transformer.final_layernorm.weight"] = torch.rand(hidden, generator=g) + 0.5
    state["transformer.final_layernorm.bias"] = torch.randn(hidden, generator=g) * 0.1
    cfg = {"model_type": "chatglm", "position_encoding_2d": True, "num_layers": layers, "hidden_size": hidden,
           "num_attention_heads": 4, "inner_hidden_size": ffn, "vocab_size": vocab, "layernorm_epsilon": 1e-5,
           "max_sequence_length": 64, "torch_dtype": "float32", "_name_or_path": "THUDM/chatglm-6b"}
    write_folder(folder, cfg, state)
    shutil.copy(shared_dir / "tokenizers" / "chatglm-6b" / "ice_text.model", folder / "ice_text.model")
    return folder


@pytest.mark.parametrize("qtype,tol", [("f32", 1e-5), ("q8_0", 3e-2)])
def test_ggml_round_trip_chatglm6b(tmp_path, shared_dir, qtype, tol):
    folder = glm1_folder(tmp_path / "glm", shared_dir)
    out = convert(folder, tmp_path / "m.bin", qtype, fmt="ggml", progress=False)
    parsed = read_ggml(out)
    assert parsed.family == "chatglm" and "lm_head.weight" not in parsed.tensors  # chatglm.cpp ties the head
    ids = [5, 100, 2000, 30000, 130001, 130004, 7]
    assert rel_err(load_model(out).logits(ids), load_model(folder, dtype="f32").logits(ids)) < tol
    assert load_tokenizer(folder).encode("你好 world") == open_checkpoint(out).load_tokenizer().encode("你好 world")


def test_ggml_stores_the_ptuning_prefix(tmp_path, shared_dir):
    prefix = torch.randn(4, 2 * 2 * 2 * 8, generator=torch.Generator().manual_seed(3))
    folder = glm_folder(tmp_path / "pt", shared_dir, 65024, "THUDM/chatglm3-6b", "chatglm3-6b/tokenizer.model",
                        state={"transformer.prefix_encoder.embedding.weight": prefix}, pre_seq_len=4,
                        prefix_projection=False)
    out = convert(folder, tmp_path / "m.bin", "f32", fmt="ggml", progress=False)
    assert read_ggml(out).config["pre_seq_len"] == 4
    ours, source = load_model(out), load_model(folder, dtype="f32")
    assert ours.prefix_len == 4 and rel_err(ours.logits(IDS), source.logits(IDS)) < 5e-3  # the prefix is f16
    with pytest.raises(ValueError, match="P-Tuning"):
        convert(folder, tmp_path / "m.gguf", "f32", progress=False)


# ----- refusals, interruption, CLI -----

def test_formats_that_cannot_hold_the_model_are_refused(tmp_path, shared_dir, llama_dir):
    glm1 = glm1_folder(tmp_path / "glm", shared_dir, layers=1)
    with pytest.raises(ValueError, match="--format ggml"):
        convert(glm1, tmp_path / "a.gguf", "q4_0", progress=False)
    with pytest.raises(ValueError, match="--format gguf"):
        convert(llama_dir[0], tmp_path / "b.bin", "q4_0", fmt="ggml", progress=False)
    with pytest.raises(ValueError, match="--format gguf"):
        convert(glm1, tmp_path / "c.bin", "bf16", fmt="ggml", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["glm"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("fmt", ["gguf", "ggml"])
def test_interrupted_conversion_leaves_no_output(tmp_path, monkeypatch, glm3_dir, error, fmt):
    import chatglm.convert as module

    real, calls = module.encode, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise error("stopped mid-way")
        return real(*args)

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "m.bin").write_bytes(b"an older file")
    monkeypatch.setattr(module, "encode", failing)
    with pytest.raises(error):
        convert(glm3_dir, out_dir / "m.bin", "q8_0", fmt=fmt, progress=False)
    assert [p.name for p in out_dir.iterdir()] == ["m.bin"] and (out_dir / "m.bin").read_bytes() == b"an older file"


def test_cli_convert(tmp_path, llama_dir, capsys):
    parser = argparse.ArgumentParser(prog="chatglm")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", "-i", str(llama_dir[0]), "-t", "q8_0", "-o", str(tmp_path / "m.gguf")])
    assert args.format == "gguf" and args.lora is None
    assert args.func(args) == 0 and (tmp_path / "m.gguf").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.gguf").stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not a private temp
    assert "m.gguf" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "-i", "x", "-t", "q3_k", "-o", "y"])


# ----- runtime quantization -----

def test_runtime_quantization_equals_the_converted_file(tmp_path, llama_dir):
    folder, model = llama_dir
    ckpt = open_checkpoint(folder)
    weights = quantized_weights(ckpt, "q4_0")
    q, k, v = (model.state_dict()[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    qkv = weights["layers.0.qkv"]
    assert isinstance(qkv, QTensor) and qkv.qtype == Q.Q4_0 and isinstance(weights["layers.0.attn_norm"], torch.Tensor)
    assert qkv.raw.numpy().tobytes() == quantize(torch.cat([q, k, v]).numpy(), "q4_0").tobytes()
    runtime = Decoder(ckpt.config, weights, torch.float32, "cpu", ckpt.path)
    converted = load_model(convert(folder, tmp_path / "m.gguf", "q4_0", progress=False), dtype="f32")
    assert rel_err(runtime.logits(IDS), converted.logits(IDS)) < 1e-5  # the same blocks, rows in another order


def test_pipeline_quantizes_an_hf_folder_as_it_loads(llama_dir):
    folder, model = llama_dir
    quantized = load_model(folder, dtype="q8_0")
    assert rel_err(quantized.logits(IDS), reference_logits(model)) < TOLERANCE[Q.Q8_0]
