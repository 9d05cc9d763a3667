"""lm-evaluation-harness (`--model local-completions`) end to end against `chatglm serve`: loglikelihood requests as
token ids with echo and logprobs, on a tiny multiple-choice task shipped in tests/lm_eval. Its tokenizer is built
offline by transformers from the default GGUF. The accuracy it reports must be the one the model's own logits give.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from patience import PATIENCE
from test_server_live import base_url  # noqa: F401 - the live server fixture

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "tests" / "lm_eval"


def choice_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of the continuation's token logprobs after the context, split as lm-evaluation-harness splits them."""
    context_ids = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    assert whole[: len(context_ids)] == context_ids
    table = torch.log_softmax(torch.from_numpy(model.logits(whole)).double(), dim=-1).numpy()
    return float(sum(table[k - 1, whole[k]] for k in range(len(context_ids), len(whole))))


def test_lm_eval_scores_a_multiple_choice_task_as_the_logits_do(base_url, default_gguf, tmp_path):  # noqa: F811
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    from chatglm.pipeline import Pipeline

    tokenizer_dir = tmp_path / "tokenizer"
    AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name).save_pretrained(tokenizer_dir)
    out = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OPENAI_API_KEY": "unused"}
    args = ",".join([f"base_url={base_url}/v1/completions", "model=default", f"tokenizer={tokenizer_dir}",
                     "tokenizer_backend=huggingface", "tokenized_requests=True", "num_concurrent=2",
                     "max_retries=1", "max_length=2048"])
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
                           "--tasks", "chatglm_tiny_mc", "--include_path", str(TASK), "--output_path", str(out),
                           "--log_samples"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=PATIENCE * 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(Path(glob.glob(f"{out}/**/results_*.json", recursive=True)[0]).read_text())
    samples = [json.loads(line) for line in open(glob.glob(f"{out}/**/samples_chatglm_tiny_mc_*.jsonl",
                                                           recursive=True)[0])]

    pipe = Pipeline(default_gguf)
    docs = [json.loads(line) for line in (TASK / "tiny_mc.jsonl").read_text().splitlines()]
    correct = []
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        scores = [choice_loglik(pipe.model, pipe.tokenizer, context, " " + c) for c in doc["choices"]]
        correct.append(int(np.argmax(scores)) == doc["answer"])
        sample = next(s for s in samples if s["doc"]["question"] == doc["question"])
        served = [float(r[0]) for r in sample["filtered_resps"]]
        assert served == pytest.approx(scores, abs=1e-3), doc["question"]
    assert len(samples) == len(docs)
    assert results["results"]["chatglm_tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(docs))
