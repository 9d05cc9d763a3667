"""Prefill, decode and sampling over a paged KV cache (chatglm/kv_cache.py).

Generation is a generator of token ids (as in mlx-lm), so every surface streams by default and
stops early simply by not asking for the next token.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch

from .errors import ChatGLMError
from .kv_cache import BLOCK_SIZE, KVType, default_budget
from .speculative import Drafter, accepted, verify

log = logging.getLogger("chatglm")


class ContextLengthError(ChatGLMError, ValueError):
    """The prompt alone does not fit in the model's context."""


@dataclass
class SamplingParams:
    max_new_tokens: int | None = None   # new tokens at most
    max_length: int | None = None       # prompt + new tokens at most (THUDM's and chatglm.cpp's meaning)
    do_sample: bool = True
    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 0
    repetition_penalty: float = 1.0     # ChatGLM's: divides the logits of prompt and reply tokens
    presence_penalty: float = 0.0       # OpenAI's: subtracted once from each token already in the reply
    frequency_penalty: float = 0.0      # OpenAI's: subtracted per time a token is already in the reply
    seed: int | None = None
    logprobs: int | None = None         # top entries to report per new token (0: the chosen one only); None: off
    prompt_logprobs: bool = False       # report the prompt's own token logprobs too (echo); its prefix is recomputed

    def validate(self) -> None:
        for name in ("max_new_tokens", "max_length"):
            v = getattr(self, name)
            least = 0 if name == "max_new_tokens" and self.prompt_logprobs else 1  # echo alone scores the prompt
            if v is not None and (not isinstance(v, int) or v < least):
                raise ValueError(f"{name} must be an integer of at least {least}, not {v!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, not {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, not {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, not {self.logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2 <= v <= 2:
                raise ValueError(f"{name} must be between -2 and 2, not {v}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def budget(prompt_len: int, params: SamplingParams, context: int) -> int:
    """How many tokens may be generated; a request past the context is clamped with a warning."""
    if prompt_len >= context:
        raise ContextLengthError(
            f"the prompt is {prompt_len} tokens but the model's context is {context}; shorten the conversation"
        )
    limit = context
    if params.max_length is not None:
        if params.max_length > context:
            log.warning("max_length %d exceeds the model's context %d; clamped", params.max_length, context)
        limit = min(limit, params.max_length)
    new = limit - prompt_len
    if params.max_new_tokens is not None:
        new = min(new, params.max_new_tokens)
    return max(new, 0)


Logprob = tuple[int, float, list[tuple[int, float]]]  # (id, its logprob, the top ids and logprobs)


class TokenMask(Protocol):
    """A grammar's state for one sequence (grammar.py): logits with the ids it forbids at -inf, and the ids drawn."""

    def apply(self, logits: torch.Tensor) -> torch.Tensor: ...

    def accept(self, token: int) -> None: ...


def logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[Logprob]:
    """The log-softmax of raw logits rows [n, vocab] at `tokens` [n], with the `top` likeliest entries of each row."""
    table = torch.log_softmax(logits.float(), dim=-1)
    chosen = table.gather(1, torch.tensor(tokens, dtype=torch.long, device=table.device)[:, None])[:, 0].tolist()
    best = table.topk(top, dim=-1) if top else None
    out = []
    for row, (token, value) in enumerate(zip(tokens, chosen)):
        entries = list(zip(best.indices[row].tolist(), best.values[row].tolist())) if best is not None else []
        out.append((token, value, entries))
    return out


class Sampler:
    """Turns one row of logits into a token id: penalties, a grammar's mask, temperature, top-k, top-p, draw.

    A Sampler serves one sequence: it counts the tokens it returns, which are the reply's tokens
    (the one stop token it may return ends the reply), so OpenAI's presence and frequency penalties
    see the reply and never the prompt, at no per-token cost beyond one update of the counts.
    """

    def __init__(self, params: SamplingParams, vocab_limit: int | None = None, mask: TokenMask | None = None):
        params.validate()
        self.params = params
        self.vocab_limit = vocab_limit
        self.mask = mask
        self.last_logprob: Logprob | None = None  # the last draw's, when params.logprobs asks
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.counts: torch.Tensor | None = None  # times each id was returned; kept only when a penalty needs it

    def penalized(self, logits: torch.Tensor, previous: Sequence[int]) -> torch.Tensor:
        """The logits with the padding rows dropped and the penalties applied; `previous` is prompt + reply."""
        p = self.params
        logits = logits.float()
        if self.vocab_limit is not None and logits.shape[-1] > self.vocab_limit:
            logits = logits[: self.vocab_limit]  # padded rows past the tokenizer are never tokens
        if p.repetition_penalty != 1.0 and previous:
            ids = torch.tensor(sorted(set(previous)), dtype=torch.long)
            ids = ids[ids < logits.shape[-1]]
            seen = logits[ids]
            logits = logits.clone()
            logits[ids] = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            if self.counts is None:
                self.counts = torch.zeros_like(logits)  # one row per real token, on the logits' device
            logits = logits - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()
        if self.mask is not None:
            logits = self.mask.apply(logits)
        return logits

    def __call__(self, logits: torch.Tensor, previous: Sequence[int]) -> int:
        token = self.pick(self.penalized(logits, previous))
        self.record(token, logits)
        return token

    def record(self, token: int, logits: torch.Tensor) -> None:
        """Note a returned token (drawn here or accepted from a draft): penalty counts, grammar state, logprob."""
        if self.counts is not None:
            self.counts[token] += 1
        if self.mask is not None:
            self.mask.accept(token)
        if self.params.logprobs is not None:  # of the model's own distribution: before penalties and temperature
            self.last_logprob = logprobs(logits[None, : self.vocab_limit], [token], self.params.logprobs)[0]

    def pick(self, logits: torch.Tensor) -> int:
        """Draw from penalized logits (the argmax when greedy)."""
        if self.params.greedy:
            return int(torch.argmax(logits))
        return int(torch.multinomial(self.probabilities(logits), 1, generator=self.generator))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution a draw takes from penalized logits (temperature, top-k, top-p); drafts are judged
        against the same one."""
        p = self.params
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop = cumulative - sorted_probs > p.top_p  # keep the smallest set reaching top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return probs


def generate(model, prompt: Sequence[int], params: SamplingParams, stop_ids: frozenset[int] | set[int] = frozenset(),
             vocab_limit: int | None = None, mask: TokenMask | None = None,
             drafter: Drafter | None = None) -> Iterator[int]:
    """Yield new token ids until a stop id (not yielded), the token budget or the caller stops.

    With a drafter (speculative.py), each step checks its drafts in one forward and yields the accepted ones
    and one more token; the reply is the plain one (greedy) or distributed as the plain one (sampled).
    """
    sampler = Sampler(params, vocab_limit, mask)
    new = budget(len(prompt), params, model.config.max_position)
    if new == 0:
        return
    device = model.device
    cache = model.new_cache(1, len(prompt) + new)
    slots = torch.zeros(1, dtype=torch.long, device=device)
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    pos = torch.arange(len(prompt), device=device)[None]
    history = list(prompt)
    pending = [sampler(model(ids, pos, cache, slots, last_only=True)[0, -1], history)]
    left = new
    while True:
        for token in pending:
            if token in stop_ids:
                return
            yield token
            left -= 1
            if left == 0:
                return
            history.append(token)
        drafts = drafter.draft(history, left - 1) if drafter is not None else []
        if drafts:
            pending = verify(model, cache, 0, history, drafts, sampler, stop_ids)
        else:
            position = len(history) - 1
            logits = model(torch.tensor([[history[-1]]], device=device), torch.tensor([[position]], device=device),
                           cache, slots, last_only=True)[0, -1]
            pending = [sampler(logits, history)]


PREFILL_CHUNK = 2048  # prompt tokens a forward at most: 8 prompts of 1,000 tokens at once took 1 GB of scratch


class QueueFullError(ChatGLMError):
    """Every slot is busy and the waiting line is at its limit; the caller should retry later."""


@dataclass
class Request:
    """One sequence in the batch engine. Tokens arrive on `tokens`; None marks the end."""

    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    vocab_limit: int | None = None
    mask: TokenMask | None = None
    leader: "Request | None" = None  # n > 1: the sibling whose prefill this one shares

    def __post_init__(self) -> None:
        self.tokens: "queue.Queue[int | None]" = queue.Queue()
        self.cancelled = threading.Event()
        self.finish_reason: str | None = None   # "stop", "length" or "cancelled"
        self.error: BaseException | None = None
        self.generated: list[int] = []
        self.logprobs: list[Logprob] = []        # per generated token (and the stop token), if params.logprobs asks
        self.prompt_logprobs: list[Logprob | None] | None = None  # params.prompt_logprobs: None for the first
        self.sampler = Sampler(self.params, self.vocab_limit, self.mask)

    def cancel(self) -> None:
        """Free the slot at the next step (a client went away)."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[int]:
        while True:
            token = self.tokens.get()
            if token is None:
                if self.error is not None:
                    raise self.error
                return
            yield token


@dataclass
class _Slot:
    index: int
    cached: list[int]                  # the prompt and reply so far; all but the last have keys and values written
    request: Request | None = None
    budget: int = 0


class BatchEngine:
    """Continuous batching over one paged KV pool: requests join and leave between decode steps; all running
    sequences decode in one batched forward. A request is admitted when a slot is free and the pool has blocks
    for its prompt (else it waits in the queue); a finished or cancelled sequence frees its slot and blocks at
    once. Full blocks are shared by content, so a common system prompt or the conversation so far is prefilled
    once; a running sequence the pool cannot grow ends with finish reason "length".
    """

    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, context: int | None = None,
                 kv_memory: int | None = None, kv_dtype: KVType | None = None, block_size: int = BLOCK_SIZE,
                 share_prefixes: bool = True, prefill_chunk: int = PREFILL_CHUNK, drafter: Drafter | None = None):
        self.model = model
        self.drafter = drafter  # drafts checked in one forward while a single sequence runs (speculative.py)
        self.prefill_chunk = prefill_chunk
        self.share = share_prefixes and model.prefix_reusable  # GLM v1's two-way context changes earlier states
        self.context = min(context or model.config.max_position, model.config.max_position)
        memory = default_budget() if kv_memory is None else kv_memory  # a pool never takes more than it can use
        self.cache = model.new_cache(max_batch, self.context, memory=memory, dtype=kv_dtype, block_size=block_size)
        self.slots = [_Slot(i, []) for i in range(max_batch)]
        self.max_queue = max_queue
        self.waiting: "collections.deque[Request]" = collections.deque()
        self.lock = threading.Condition()
        self.closed = False
        self.stats = {"requests": 0, "tokens": 0, "batch_size": 0, "prefill_tokens": 0, "reused_tokens": 0,
                      "pool_short": 0, "peak_blocks": 0, "prefix_lookups": 0, "prefix_hit_blocks": 0,
                      "drafted_tokens": 0, "accepted_tokens": 0}
        self._siblings: dict[int, list[int]] = {}
        self.thread = threading.Thread(target=self._run, name="chatglm-batch", daemon=True)
        self.thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def submit(self, prompt: Sequence[int], params: SamplingParams, stop_ids: frozenset[int] = frozenset(),
               vocab_limit: int | None = None, mask: TokenMask | None = None) -> Request:
        """Queue a request; raises QueueFullError when the line is full, ContextLengthError when too long
        for the context or for the whole KV pool."""
        return self.submit_group(prompt, [params], stop_ids, vocab_limit, [mask])[0]

    def submit_group(self, prompt: Sequence[int], params: Sequence[SamplingParams],
                     stop_ids: frozenset[int] = frozenset(), vocab_limit: int | None = None,
                     masks: Sequence[TokenMask | None] = ()) -> list[Request]:
        """Queue len(params) continuations of one prompt (OpenAI's n). Queued together, they share the prompt's
        full blocks in the pool by content: the first prefills them, the others find them cached."""
        for p in params:
            p.validate()
            budget(len(prompt), p, self.context)
        if len(prompt) + 1 > self.cache.capacity:
            raise ContextLengthError(f"the prompt is {len(prompt)} tokens but the KV cache holds "
                                     f"{self.cache.capacity} tokens at most; raise --kv-memory")
        if len(params) > self.max_queue:
            raise ValueError(f"n is {len(params)}, but at most {self.max_queue} requests may wait at once")
        masks = list(masks) or [None] * len(params)
        leader = Request(list(prompt), params[0], frozenset(stop_ids), vocab_limit, masks[0])
        group = [leader] + [Request(leader.prompt, p, leader.stop_ids, vocab_limit, m, leader)
                            for p, m in zip(params[1:], masks[1:])]
        with self.lock:
            if self.closed:
                raise ChatGLMError("the engine is shut down")
            if len(self.waiting) + len(group) > self.max_queue:
                raise QueueFullError(f"{len(self.waiting)} requests are already waiting")
            self.waiting.extend(group)
            self.stats["requests"] += len(group)
            self.lock.notify()
        return group

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.thread.join(timeout=10)

    # --- the worker thread ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.closed and not self.waiting and not any(s.request for s in self.slots):
                    self.lock.wait()
                if self.closed:
                    break
                admitted = self._admit()
            try:
                if admitted:
                    self._prefill(admitted)
                self._decode()
            except Exception as e:  # a failure ends the requests in flight, never the engine
                log.exception("batch step failed")
                for slot in self.slots:
                    if slot.request:
                        slot.request.error = e
                        self._finish(slot, "error")
        for slot in self.slots:
            if slot.request:
                self._finish(slot, "cancelled")
        for request in self.waiting:
            request.finish_reason = "cancelled"
            request.tokens.put(None)

    def _admit(self) -> list[tuple[int, int]]:
        """Give waiting requests, in order, a free slot with blocks for the prompt: (slot, tokens already cached).

        A request whose next prompt block is being computed by one admitted in this round waits one round,
        so requests sharing a system prompt that arrive together prefill it once.
        """
        admitted: list[tuple[int, int]] = []
        pending: set[bytes] = set()  # full prompt blocks this round computes
        leaders: set[int] = set()  # ids of the requests admitted this round (n > 1: their siblings fork them)
        for request in list(self.waiting):
            free = [s for s in self.slots if s.request is None]
            if not free:
                break
            if request.cancelled.is_set():
                self.waiting.remove(request)
                request.finish_reason = "cancelled"
                request.tokens.put(None)
                continue
            slot, prompt = free[0], request.prompt
            forked = self.model.prefix_reusable and request.leader is not None and id(request.leader) in leaders
            scored = request.params.prompt_logprobs  # echo scores the whole prompt
            shared = prompt if self.share and not scored and not forked else ()
            start = self.cache.start(slot.index, shared)
            chain = list(self.cache.hashes(shared, len(shared) - 1))
            hit = len(self.cache.chains[slot.index])  # blocks found cached
            if chain[hit:hit + 1] and chain[hit] in pending:
                self.cache.release(slot.index)
                continue
            if not self.cache.grow(slot.index, len(prompt) + 1):  # the prompt and the first reply token
                self.cache.release(slot.index)
                self.stats["pool_short"] += 1
                break  # first come, first served: later requests wait too
            self.waiting.remove(request)
            pending.update(chain[hit:])
            self.stats["prefix_lookups"] += bool(shared)
            self.stats["prefix_hit_blocks"] += hit
            leaders.add(id(request))
            slot.request, slot.cached = request, list(prompt)
            slot.budget = budget(len(prompt), request.params, self.context)
            admitted.append((slot.index, start))
        return admitted

    def _prefill(self, admitted: list[tuple[int, int]]) -> None:
        """Run the new prompts of the admitted slots together, right-padded to one length, at most
        `prefill_chunk` tokens a forward (the attention's scratch grows with the square of a chunk).

        Each row starts after the blocks the pool already held for it. Padding columns take positions
        past their prompt (clamped to the context): what they write lands in the sequence's own
        unwritten rows, overwritten by its decode steps before any query reads them, or in the null block.
        A family whose context attends both ways (GLM v1) takes its prompts whole.
        """
        where = {id(self.slots[i].request): i for i, _ in admitted}
        self._siblings: dict[int, list[int]] = {}  # n > 1: a leader's slot -> the slots that fork its prefill
        if self.model.prefix_reusable:
            for index, _ in admitted:
                leader = self.slots[index].request.leader
                if leader is not None and id(leader) in where:
                    self._siblings.setdefault(where[id(leader)], []).append(index)
        forks = {i for group in self._siblings.values() for i in group}
        admitted = [a for a in admitted if a[0] not in forks]
        scored = [a for a in admitted if self.slots[a[0]].request.params.prompt_logprobs]
        plain = [a for a in admitted if not self.slots[a[0]].request.params.prompt_logprobs]
        if plain:
            self._prefill_rows(plain)
        for index, _ in scored:
            self._prefill_scored(index)

    def _prefill_rows(self, admitted: list[tuple[int, int]]) -> None:
        device = self.model.device
        indices = [i for i, _ in admitted]
        starts = [start for _, start in admitted]
        lengths = [len(self.slots[i].cached) - start for i, start in admitted]
        width = max(lengths)
        ids = torch.zeros(len(indices), width, dtype=torch.long)
        for row, (index, start) in enumerate(admitted):
            ids[row, : lengths[row]] = torch.tensor(self.slots[index].cached[start:])
        pos = (torch.tensor(starts)[:, None] + torch.arange(width)).clamp(max=self.context - 1)
        chunk = max(1, self.prefill_chunk // len(indices)) if self.model.prefix_reusable else width
        logits: list[torch.Tensor | None] = [None] * len(indices)
        for c0 in range(0, width, chunk):
            c1 = min(c0 + chunk, width)
            rows = [r for r, n in enumerate(lengths) if n > c0]  # prompts not yet through
            take = torch.tensor([min(lengths[r], c1) - 1 - c0 for r in rows], device=device)
            out = self.model(ids[rows, c0:c1].to(device), pos[rows, c0:c1].to(device), self.cache,
                             torch.tensor([indices[r] for r in rows], device=device), take=take)[:, 0]
            for k, r in enumerate(rows):
                if lengths[r] <= c1:
                    logits[r] = out[k]
        for row, (index, start) in enumerate(admitted):
            slot = self.slots[index]
            if self.share:
                self.cache.commit(index, slot.cached)
            self.stats["prefill_tokens"] += lengths[row]
            self.stats["reused_tokens"] += start
            self._begin(index, logits[row])

    def _prefill_scored(self, index: int) -> None:
        """Echo: the whole prompt in one forward (no cached blocks, no chunks) with every position's logits,
        for the logprobs of the prompt's own tokens."""
        device = self.model.device
        slot = self.slots[index]
        request, prompt = slot.request, slot.cached
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        pos = torch.arange(len(prompt), device=device).clamp(max=self.context - 1)[None]
        logits = self.model(ids, pos, self.cache, torch.tensor([index], device=device), take=None)[0]
        request.prompt_logprobs = [None, *logprobs(logits[:-1, : request.vocab_limit], prompt[1:],
                                                   request.params.logprobs or 0)]
        if self.share:
            self.cache.commit(index, slot.cached)
        self.stats["prefill_tokens"] += len(prompt)
        self._begin(index, logits[-1])

    def _begin(self, index: int, logits: torch.Tensor) -> None:
        """A prefilled slot's first token, and its siblings' (n > 1): each takes the leader's prompt blocks
        (full ones shared, the last partial one copied) and draws from the same logits."""
        leader = self.slots[index]
        siblings = [self.slots[i] for i in self._siblings.get(index, ())]
        for slot in siblings:  # before the leader starts: a leader that ends at once frees its blocks
            self.cache.fork(index, slot.index, len(leader.cached))
            slot.cached = list(leader.cached)
            slot.request.prompt_logprobs = leader.request.prompt_logprobs
            self.stats["reused_tokens"] += len(leader.cached)
        self._start(leader, logits)
        for slot in siblings:
            self._start(slot, logits)

    def _start(self, slot: _Slot, logits: torch.Tensor) -> None:
        """A prefilled request's first token; echo with max_tokens 0 ends at once."""
        if slot.budget == 0:
            self._finish(slot, "length")
        else:
            self._accept(slot, logits)

    def _decode(self) -> None:
        for slot in self.slots:
            if slot.request is not None and slot.request.cancelled.is_set():
                self._finish(slot, "cancelled")
            elif slot.request is not None and not self.cache.grow(slot.index, len(slot.cached)):
                self.stats["pool_short"] += 1
                self._finish(slot, "length")  # the pool cannot hold its next token
        running = [s.index for s in self.slots if s.request is not None]
        if not running:
            return
        self.stats["batch_size"] = len(running)
        self.stats["peak_blocks"] = max(self.stats["peak_blocks"], self.cache.in_use())
        if len(running) == 1 and self.drafter is not None and self._speculate(self.slots[running[0]]):
            return
        device = self.model.device
        last = [self.slots[i].cached[-1] for i in running]
        pos = [len(self.slots[i].cached) - 1 for i in running]
        logits = self.model(torch.tensor(last, device=device)[:, None], torch.tensor(pos, device=device)[:, None],
                            self.cache, torch.tensor(running, device=device))[:, -1]
        for row, i in enumerate(running):
            if self.share:
                self.cache.commit(i, self.slots[i].cached)
            self._accept(self.slots[i], logits[row])

    def _speculate(self, slot: _Slot) -> bool:
        """The one running sequence's drafts checked in one forward; False (nothing done) when there are none.
        Only the accepted tokens are committed to the prefix index: rows of rejected ones are never shared."""
        request = slot.request
        if request.params.logprobs is not None:  # reported one step at a time
            return False
        drafts = self.drafter.draft(slot.cached, slot.budget - len(request.generated) - 1)
        if not drafts or not self.cache.grow(slot.index, len(slot.cached) + len(drafts)):
            return False
        tokens = verify(self.model, self.cache, slot.index, slot.cached, drafts, request.sampler, request.stop_ids)
        self.stats["drafted_tokens"] += len(drafts)
        self.stats["accepted_tokens"] += accepted(tokens, drafts)
        if self.share:
            self.cache.commit(slot.index, slot.cached + tokens[:-1])
        for token in tokens:
            if slot.request is not None:
                self._emit(slot, token)
        return True

    def _accept(self, slot: _Slot, logits: torch.Tensor) -> None:
        """Sample the next token of a slot's request from its logits, emit it or finish."""
        request = slot.request
        token = request.sampler(logits, slot.cached)  # the prompt and the reply so far, without a copy
        if request.sampler.last_logprob is not None:  # the stop token's too, last (legacy completions show it)
            request.logprobs.append(request.sampler.last_logprob)
        self._emit(slot, token)

    def _emit(self, slot: _Slot, token: int) -> None:
        """Hand a slot's next token to its request, or finish at a stop id or the token budget."""
        request = slot.request
        if token in request.stop_ids:
            self._finish(slot, "stop")
            return
        request.generated.append(token)
        slot.cached.append(token)  # its keys and values are written by the next decode step
        self.stats["tokens"] += 1
        request.tokens.put(token)
        if len(request.generated) >= slot.budget:
            self._finish(slot, "length")

    def _finish(self, slot: _Slot, reason: str) -> None:
        request = slot.request
        request.finish_reason = reason
        request.tokens.put(None)
        slot.request = None
        slot.cached = []
        self.cache.release(slot.index)  # its full blocks stay cached for a later prompt that starts the same way
