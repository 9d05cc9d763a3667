"""Speculative decoding: drafts as llama-cpp-python's prompt lookup makes them, greedy replies identical to plain
decoding, sampled replies distributed as plain ones (the rejection rule), rejected rows never cached as content."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from chatglm import load_model
from chatglm.bench import CountedDrafter
from chatglm.engine import BatchEngine, Sampler, SamplingParams, generate
from chatglm.speculative import DraftModel, PromptLookup, verify

from checkpoints import tiny_llama
from patience import PATIENCE

PROMPT = [5, 9, 31, 2, 77, 5, 9, 31, 40, 41, 42, 43, 5, 9]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("target")
    tiny_llama(layers=2).save_pretrained(folder)
    return load_model(folder, dtype="f32")


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory):
    folder = tmp_path_factory.mktemp("draft")
    tiny_llama(layers=1, seed=1).save_pretrained(folder)
    return load_model(folder, dtype="f32")


class Scripted:
    """Drafts a fixed run of tokens whatever the history (most of them wrong): exercises every rejection."""

    def __init__(self, tokens, check=None):
        self.tokens, self.calls, self.check = list(tokens), 0, check

    def draft(self, history, limit):
        self.calls += 1
        if self.check is not None:
            self.check()
        return self.tokens[:limit]


def test_lookup_drafts_as_llama_cpp_python(llama_cpp):
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    rng = np.random.default_rng(0)
    ours, theirs = PromptLookup(tokens=10, max_ngram=2), LlamaPromptLookupDecoding(max_ngram_size=2, num_pred_tokens=10)
    found = 0
    for _ in range(300):
        ids = rng.integers(0, 6, size=int(rng.integers(2, 40))).astype(np.intc)
        expected = theirs(ids).tolist()
        assert PromptLookup(10, 2).draft(ids.tolist(), 10) == expected == ours.draft(list(ids), 10)
        found += bool(expected)
    assert found > 100  # most histories of six symbols repeat their last pair
    assert ours.draft([1, 2, 3, 4, 1, 2], 3) == [3, 4, 1] and ours.draft([7, 8, 9], 5) == []


def test_greedy_with_drafts_is_the_plain_reply(tiny, tiny_draft):
    params = dict(do_sample=False, max_new_tokens=40)
    plain = list(generate(tiny, PROMPT, SamplingParams(**params)))
    assert len(plain) == 40
    for drafter in (PromptLookup(), Scripted([5, 9, 31, 7, 7, 7]), DraftModel(tiny_draft, 128), DraftModel(tiny, 128)):
        assert list(generate(tiny, PROMPT, SamplingParams(**params), drafter=drafter)) == plain, drafter


def test_drafts_stop_at_stop_ids_and_budget(tiny):
    plain = list(generate(tiny, PROMPT, SamplingParams(do_sample=False, max_new_tokens=30)))
    stop = plain[7]
    first = plain.index(stop)
    echo = Scripted(plain[1:] * 2)  # the true continuation from the start: long accepted runs
    out = list(generate(tiny, PROMPT, SamplingParams(do_sample=False, max_new_tokens=30), {stop}, drafter=echo))
    assert out == plain[:first]
    for n in (1, 2, 5, 11):
        out = list(generate(tiny, PROMPT, SamplingParams(do_sample=False, max_new_tokens=n), drafter=PromptLookup()))
        assert out == plain[:n]


class Forbid:
    """A token mask that forbids a set of ids (the grammar stage's interface)."""

    def __init__(self, ids):
        self.ids, self.seen = list(ids), []

    def apply(self, logits):
        return logits.index_fill(0, torch.tensor(self.ids), float("-inf"))

    def accept(self, token):
        self.seen.append(token)


def test_greedy_through_a_mask_and_penalties_is_the_plain_reply(tiny):
    params = dict(do_sample=False, max_new_tokens=30, repetition_penalty=1.2, presence_penalty=0.4,
                  frequency_penalty=0.3)
    plain_mask, spec_mask = Forbid(range(10, 60)), Forbid(range(10, 60))
    plain = list(generate(tiny, PROMPT, SamplingParams(**params), mask=plain_mask))
    spec = list(generate(tiny, PROMPT, SamplingParams(**params), mask=spec_mask, drafter=Scripted(plain[1:])))
    assert spec == plain and spec_mask.seen == plain_mask.seen == plain


class Bigram:
    """A model whose next-token logits depend on the last token only (a few-token vocabulary): cheap enough for
    tens of thousands of draws, with exact distributions to compare against."""

    device = torch.device("cpu")

    def __init__(self, vocab: int = 6, seed: int = 0):
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 1.5

    def __call__(self, ids, pos, cache, slots):
        return self.table[ids]


def test_sampled_first_two_tokens_are_distributed_as_plain_sampling():
    """Exact p(t1) p(t2 | t1) from the plain sampler's own transformations (penalties, temperature, top-k, top-p)
    against 20,000 draws through the rejection rule, with drafts that are often rejected and often accepted."""
    stats = pytest.importorskip("scipy.stats")
    model, prompt = Bigram(), [0, 3, 1, 3]
    params = dict(temperature=0.9, top_k=4, top_p=0.95, repetition_penalty=1.3, presence_penalty=0.5)

    def next_distribution(sampler, previous):
        p = sampler.probabilities(sampler.penalized(model.table[previous[-1]], previous))
        return p / p.sum()

    reference = Sampler(SamplingParams(**params))
    p1 = next_distribution(reference, prompt)
    exact = {}
    for a in torch.nonzero(p1).flatten().tolist():
        follow = Sampler(SamplingParams(**params))
        next_distribution(follow, prompt)  # as a draw does: the penalties' counts start with the first row
        follow.record(a, p1)
        for b, q in enumerate(next_distribution(follow, prompt + [a]).tolist()):
            if q > 0:
                exact[(a, b)] = float(p1[a]) * q
    ranked = sorted(range(len(p1)), key=lambda a: -float(p1[a]))
    n = 20000
    for drafts in ([ranked[1], ranked[0]], [ranked[0], ranked[1]]):
        counts: dict[tuple[int, int], int] = {}
        for seed in range(n):
            sampler = Sampler(SamplingParams(seed=seed, **params))
            out = verify(model, None, 0, list(prompt), drafts, sampler, frozenset())
            if len(out) == 1:  # the first draft was rejected: the second token comes from a plain step
                out.append(sampler(model.table[out[0]], prompt + out))
            counts[out[0], out[1]] = counts.get((out[0], out[1]), 0) + 1
        assert set(counts) <= set(exact)
        cells = sorted(exact)
        observed = np.array([counts.get(c, 0) for c in cells], dtype=float)
        expected = np.array([exact[c] for c in cells]) * n
        assert expected.min() >= 5  # every cell is large enough for the chi-square test
        assert stats.chisquare(observed, expected * n / expected.sum()).pvalue > 1e-3
        firsts = np.array([sum(v for (a, _), v in counts.items() if a == f) for f in ranked], dtype=float)
        first_expected = p1[ranked].double().numpy()
        kept = first_expected > 0
        assert stats.chisquare(firsts[kept], first_expected[kept] / first_expected[kept].sum() * n).pvalue > 1e-3
        assert 0.05 < firsts[0] / n < 0.95  # both branches of the rule ran often


def test_default_model_greedy_with_lookup_is_the_plain_reply(default_gguf):
    """The real file through the fused C++ step: drafts checked as one-token rows round as plain steps do
    (a prefill-shaped check flipped a near-tie 19 tokens into this reply)."""
    from pathlib import Path

    from chatglm import Pipeline

    pipe = Pipeline(default_gguf)
    text = (Path(__file__).resolve().parents[1] / "bench" / "prompts" / "edit_typos.txt").read_text()
    prompt, _ = pipe.chat_prompt([{"role": "user", "content": text}])
    params = SamplingParams(do_sample=False, max_new_tokens=96)
    plain = list(generate(pipe.model, prompt, params, pipe.stop_ids))
    lookup = CountedDrafter(PromptLookup(10))  # one call a forward: far fewer than tokens means accepted drafts
    assert list(generate(pipe.model, prompt, params, pipe.stop_ids, drafter=lookup)) == plain
    assert "lighthouse" in pipe.tokenizer.decode(plain) and lookup.calls < len(plain) // 2


def _engine_reply(engine, prompt, **params):
    request = engine.submit(prompt, SamplingParams(do_sample=False, **params))
    return list(request), request


def test_batch_engine_drafts_keep_replies_and_never_cache_rejected_rows(tiny):
    """Block size 4 fills many blocks; scripted drafts are mostly wrong, so rejected rows land in blocks that
    later fill with accepted tokens. Before every step, each block the pool indexes must be a block of the true
    reply holding what a plain prefill writes there (another request may take it as its prefix at any step)."""
    plain = list(generate(tiny, PROMPT, SamplingParams(do_sample=False, max_new_tokens=40)))
    tokens = PROMPT + plain
    reference = tiny.new_cache(1, len(tokens), block_size=4)
    tiny(torch.tensor([tokens]), torch.arange(len(tokens))[None], reference, torch.zeros(1, dtype=torch.long))
    engine = BatchEngine(tiny, max_batch=2, context=128, block_size=4)
    truth = {digest: reference.tables[0, k] for k, digest in enumerate(engine.cache.hashes(tokens, len(tokens)))}
    checked = []

    def only_true_blocks_indexed():
        for digest, block in list(engine.cache.index.items()):
            assert digest in truth
            torch.testing.assert_close(engine.cache.kv[:, :, :, block], reference.kv[:, :, :, truth[digest]],
                                       atol=1e-5, rtol=1e-5)
        checked.append(len(engine.cache.index))

    engine.drafter = Scripted([3, 3, 3, 3, 3], only_true_blocks_indexed)
    try:
        reply, request = _engine_reply(engine, PROMPT, max_new_tokens=40)
        assert reply == plain and request.finish_reason == "length" and len(checked) > 10
        assert engine.stats["drafted_tokens"] > engine.stats["accepted_tokens"]  # rejections happened
        assert checked[-1] >= (len(tokens) - 2) // 4  # the reply's blocks were indexed as they filled
        # a follow-up turn takes those blocks as its prefix and continues as plain decoding does
        engine.drafter.check = None  # its own blocks are not the first reply's
        follow = tokens + [7, 8]
        again, _ = _engine_reply(engine, follow, max_new_tokens=12)
        assert engine.stats["prefix_hit_blocks"] >= checked[-1]
        assert again == list(generate(tiny, follow, SamplingParams(do_sample=False, max_new_tokens=12)))
    finally:
        engine.close()


def test_batch_engine_lookup_and_draft_model_replies_are_plain(tiny, tiny_draft):
    for drafter in (PromptLookup(), DraftModel(tiny_draft, 128)):
        engine = BatchEngine(tiny, max_batch=2, context=128, drafter=drafter)
        try:
            for n in (1, 3, 30):
                reply, _ = _engine_reply(engine, PROMPT, max_new_tokens=n)
                assert reply == list(generate(tiny, PROMPT, SamplingParams(do_sample=False, max_new_tokens=n)))
        finally:
            engine.close()


def test_draft_with_another_vocabulary_is_refused_naming_both_files(tmp_path, default_gguf, shared_dir):
    from chatglm import load_tokenizer
    from chatglm.errors import ChatGLMError
    from chatglm.speculative import open_draft
    from chatglm.synthetic import synthetic_gguf

    tiny_file = synthetic_gguf("chatglm-tiny", "q4_0", tmp_path)  # the default model's vocabulary
    target = shared_dir / "tokenizers" / "chatglm3-6b" / "tokenizer.model"
    chatglm3 = load_tokenizer(target, family="chatglm2")
    with pytest.raises(ChatGLMError) as refused:
        open_draft(tiny_file, target, chatglm3, 64)
    assert str(tiny_file) in str(refused.value) and str(target) in str(refused.value)
    same = open_draft(tiny_file, default_gguf, load_tokenizer(default_gguf), 64)  # the same vocabulary: taken
    assert same.draft([5, 6, 7], 3) and same.model.config.num_layers == 2


def test_bench_prompt_file_against_llama_cpp_python(default_gguf, llama_cpp):
    import json
    import subprocess
    import sys
    from pathlib import Path

    prompt = Path(__file__).resolve().parents[1] / "bench" / "prompts" / "edit_typos.txt"
    proc = subprocess.run([sys.executable, "-m", "chatglm", "bench", "--prompt-file", str(prompt), "--new-tokens",
                           "24", "--rounds", "1", "--compare", "llama.cpp", "--json"], capture_output=True, text=True,
                          timeout=PATIENCE)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["plain_tok_s"] > 0 and result["speculative_tok_s"] > 0 and 0 < result["acceptance"] <= 1
    assert result["llama_cpp"]["speculative_tok_s"] > 0 and result["prompt_tokens"] > 100


def test_glm_v1_and_alibi_greedy_with_drafts_is_the_plain_reply(tmp_path):
    """The families with their own positions: GLM v1's 2D ones counting on from <sop>, Baichuan's ALiBi bias."""
    from checkpoints import write_folder
    from test_models import GLM_CONFIG, GLM_NAMES, GLM_SIZES, baichuan_state
    from test_paged_cache import random_state

    glm = load_model(write_folder(tmp_path / "glm", dict(GLM_CONFIG, max_sequence_length=64),
                                  random_state(GLM_NAMES, GLM_SIZES, 3)), dtype="f32")
    cfg = {"model_type": "baichuan", "hidden_size": 48, "intermediate_size": 64, "num_attention_heads": 6,
           "num_hidden_layers": 2, "rms_norm_eps": 1e-6, "vocab_size": 96, "model_max_length": 64,
           "torch_dtype": "float32"}
    alibi = load_model(write_folder(tmp_path / "alibi", cfg, baichuan_state(vocab=96, hidden=48, layers=2, ffn=64,
                                                                            seed=4)), dtype="f32")
    assert alibi.config.extra["alibi"]
    params = dict(do_sample=False, max_new_tokens=30)
    for model, prompt in ((glm, [4, 4, 3, 0, 0, 3, 1, 2]), (alibi, PROMPT)):  # GLM's ends with [gMASK] <sop>
        plain = list(generate(model, prompt, SamplingParams(**params)))
        for drafter in (PromptLookup(), Scripted([3, 4, 0, 4])):
            assert list(generate(model, prompt, SamplingParams(**params), drafter=drafter)) == plain


def test_chat_flags_reach_the_pipeline(default_gguf, capsys):
    from chatglm.cli import main

    assert main(["chat", "--lookup", "5", "--draft", str(default_gguf), "-p", "hi"]) == 1
    assert "--draft and --lookup" in capsys.readouterr().err
    assert main(["chat", "--lookup", "-2", "-p", "hi"]) == 1
    assert "--lookup must be at least 1" in capsys.readouterr().err
    args = ["chat", "--temp", "0", "--max-new-tokens", "24", "-p", "Repeat exactly: the cat sat on the mat."]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--lookup", "8"]) == 0 and capsys.readouterr().out == plain and "cat" in plain
