"""Continuous-batching generation over a paged KV cache: the rollout engine for RLHF.

- **Paged KV pool**: per layer one (num_pages, page_size, Hkv, D) tensor for keys and one for values. A request gets
  the pages for its prompt and its token budget when it is admitted (no preemption: admission waits while pages are
  short) and returns them when it finishes. Page 0 is a scratch page that the padding rows of a decode batch write to.
- **Slots**: a fixed number (``max_batch``) of decode rows; a request occupies the lowest free slot, so the live rows
  sit at the front and the decode batch is the smallest bucket (1, 2, 4, ..., max_batch) covering them.
- **Prefill**: the prompts admitted together are packed (T,) with cu_seqlens and run through the model's ordinary
  packed forward (varlen flash attention, positions restarting per prompt); each layer writes its rotated k/v into
  the prompts' pages. The head runs only at each prompt's last token. (On the float32 CPU path prefill and decode are
  ``models.decode_step``'s functions of ATen calls over per-slot caches instead.)
- **Decode**: one token per slot; every layer makes one ``ik.flash_attn_with_kvcache`` call for the whole batch,
  which rotates q and the new k, appends k/v into the pages and attends over them (split-KV kernel on GPU). The step
  reads only fixed-address buffers (tokens, block table, cache lengths, all sized max_batch) and its shapes depend
  only on the bucket, so on CUDA it is captured once per bucket as a CUDA graph and replayed (``cuda_graphs``).
- **Refill**: after each step finished requests free their slot and pages, and queued prompts are admitted and
  prefilled at once.
- **Sampling**: greedy (temperature 0), or softmax(logits / T) restricted to the top-k tokens and then to the top-p
  nucleus, drawn with the caller's seeded ``torch.Generator``: one per request (its tokens then do not depend on the
  batch: PPO's per-prompt sampling) or one shared by a ``generate`` call. The model's forward is batched either way;
  only the draw runs per generator. ``generate(model, ...)`` (``model.generate``) runs one call on a generator built
  for it. Each sampled token's log-probability under
  softmax(logits / T) (T = 1 for greedy) is returned with it — what the PPO update recomputes with
  ``ik.fused_linear_logprobs(..., temperature=T)``.
- A request ends after a stop token (kept) or its max_new_tokens. Dynamic NTK RoPE is used only within
  max_position_embeddings (where it equals plain RoPE); a longer pool raises NotImplementedError.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Sequence

import torch
import torch.nn.functional as F

import internlm_kernels as ik
from internlm_kernels.backend import requested

from .context import PackedContext
from .decode_step import CpuDecodeStep
from .packing import PackedInputs


@dataclasses.dataclass
class Completion:
    tokens: list[int]          # the new tokens (ending with the stop token when one was produced)
    logprobs: list[float]      # log-probability of each sampled token under softmax(logits / T)
    finish_reason: str         # "stop" or "length"


class PagedKVPool:
    """Keys and values of every layer in pages: ``k[layer]`` / ``v[layer]`` is (num_pages, page_size, Hkv, D)."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, storage: bool = True):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is scratch), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        # storage=False: page bookkeeping only (the CPU decode path keeps keys/values per slot).
        shape = (num_layers, num_pages if storage else 0, page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.page_size = page_size
        self.free = list(range(num_pages - 1, 0, -1))   # a stack; page 0 is the scratch page
        self.capacity = num_pages - 1

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self.free):
            return None
        return [self.free.pop() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        self.free.extend(reversed(pages))


class _PrefillWriter:
    """The cache a PackedContext hands each layer's rotated k/v (T, Hkv, D) to: token t goes to
    (pages[t], offsets[t]) of the pool."""

    def __init__(self, pool: PagedKVPool, pages: torch.Tensor, offsets: torch.Tensor):
        self.pool, self.pages, self.offsets = pool, pages, offsets

    def write_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.pool.k[layer, self.pages, self.offsets] = k
        self.pool.v[layer, self.pages, self.offsets] = v


class PagedDecodeContext:
    """Rotary and attention of one new token per row through ``ik.flash_attn_with_kvcache``: q and k are rotated
    inside the op at each row's cache length, k/v appended to the row's pages, and the row attends to them."""

    def __init__(self, pool: PagedKVPool, block_table: torch.Tensor, cache_seqlens: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor):
        self.pool, self.block_table, self.cache_seqlens = pool, block_table, cache_seqlens
        self.cos, self.sin = cos, sin

    def qkv(self, wqkv_out: torch.Tensor, n_kv_heads: int, head_dim: int):
        """wqkv output (B, F) -> q (B, 1, Hq, D), k and v (B, 1, Hkv, D), not rotated (views of wqkv_out)."""
        B = wqkv_out.shape[0]
        qkv = wqkv_out.view(B, 1, n_kv_heads, -1, head_dim)      # per KV group: g query heads, k, v
        return qkv[:, :, :, :-2].reshape(B, 1, -1, head_dim), qkv[:, :, :, -2], qkv[:, :, :, -1]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = ik.flash_attn_with_kvcache(q, self.pool.k[layer], self.pool.v[layer], k, v, self.cos, self.sin,
                                         cache_seqlens=self.cache_seqlens, block_table=self.block_table, causal=True,
                                         rotary_interleaved=False)
        return out[:, 0]                                           # (B, Hq, D)


def sample(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | Sequence[torch.Generator | None] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) float32 -> (tokens (B,) int64, their log-probabilities (B,) under softmax(logits / T)).

    ``generator``: one for all rows (drawn in row order), or one per row: the rows of one generator object are drawn
    together, in row order, from it alone, so a row with its own generator gets the token it would get alone (the
    distribution is computed for all rows at once; only the draw is per generator).

    With top-k the candidates are the k most likely tokens (``topk``: exactly k, a tie at the k-th probability broken
    by topk's order), in decreasing order, so top-p and the draw run over k columns instead of the vocabulary. The
    draw is the exponential race (``_race``): what ``torch.multinomial`` does for one sample, without its checks, with
    each row's exponentials drawn from its generator into one tensor (one call per generator, not ~12)."""
    scaled = logits / temperature if temperature > 0 else logits
    logp = torch.log_softmax(scaled, dim=-1)
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        order = None
        if 0 < top_k < logp.shape[-1]:
            probs, order = logp.topk(top_k, dim=-1)                        # sorted, most likely first
            probs = probs.exp_()
            if top_p < 1.0:
                probs = probs.div_(probs.sum(dim=-1, keepdim=True))       # top-p applies to the top-k renormalized
        elif top_p < 1.0:
            probs, order = logp.exp().sort(dim=-1, descending=True)
        else:
            probs = logp.exp()
        if top_p < 1.0:
            # Drop a token when the tokens ranked above it already reach top_p; the most likely one always stays.
            probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
        rows_of: dict[int, list[int]] = {}
        if not (generator is None or isinstance(generator, torch.Generator)):
            for row, g in enumerate(generator):
                rows_of.setdefault(id(g), []).append(row)
            if len(rows_of) == 1:
                generator = generator[0]
        e = torch.empty_like(probs)                 # the draw's exponentials, each row's from its generator
        if len(rows_of) <= 1:
            e.exponential_(generator=generator)
        else:
            for rows in rows_of.values():
                if len(rows) == 1:
                    e[rows[0]].exponential_(generator=generator[rows[0]])
                else:
                    e[torch.tensor(rows, device=e.device)] = torch.empty(
                        len(rows), e.shape[1], device=e.device).exponential_(generator=generator[rows[0]])
        choice = _race(probs, e)
        tokens = (choice if order is None else order.gather(-1, choice)).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def _race(weights: torch.Tensor, exponentials: torch.Tensor) -> torch.Tensor:
    """One column per row of ``weights`` (B, n) >= 0, drawn with probability proportional to its weight, given
    ``exponentials`` (B, n) i.i.d. Exp(1) (overwritten): the exponential race argmax_i w_i / E_i (E_i / w_i ~ Exp(w_i),
    and the smallest of independent exponentials is the one of rate w_i with probability w_i / Σ w). It is how
    ``torch.multinomial(weights, 1)`` draws: with the exponentials from ``empty_like(weights).exponential_(generator)``
    it gives multinomial's token and leaves the generator as multinomial does, in 2 calls instead of its ~12 (it also
    reduces the whole tensor 4 times to check it and reads two results on the host). (B, 1) int64."""
    return torch.div(weights, exponentials, out=exponentials).argmax(dim=-1, keepdim=True)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How one request samples. The rows of requests with equal ``Sampling`` are sampled in one ``sample`` call,
    each drawn from its request's generator (see ``sample``)."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0


@dataclasses.dataclass
class StepOutput:
    """What one ``step`` produced for one request: its new tokens (one, two when it was admitted in this step, none
    for a request with a zero budget) and, when it finished in this step, why."""
    request_id: int
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str | None = None


@dataclasses.dataclass
class _Request:
    id: int
    prompt: list[int]
    max_new: int
    sampling: Sampling
    generator: torch.Generator | None      # None: torch's default generator (or greedy)
    stop: frozenset
    pages: list[int] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)


class ContinuousBatchingGenerator:
    """Generation for many prompts with a paged KV pool and continuous batching (see the module docstring).

    ``max_batch`` decode slots; ``max_seq_len`` bounds prompt + new tokens of one request; ``num_pages`` (default:
    every slot at max_seq_len, plus the scratch page) sizes the pool; ``prefill_tokens`` bounds the prompt tokens
    of one prefill call (a longer prompt still runs, alone). ``cuda_graphs`` captures the decode step per batch
    bucket on CUDA (ignored on CPU).

    Two ways in: ``generate(prompts, ...)`` runs a list to completion; the incremental API that a server drives
    from one thread is ``submit`` (queue a request, get its id), ``step`` (admit and prefill what fits, then one
    decode step: the new tokens of every request, and which finished), ``cancel`` (drop a request, its slot and
    pages free at once) and ``busy``. Requests join and leave the batch at these token boundaries. Not
    thread-safe: one thread calls all of them.
    """

    def __init__(self, model, max_batch: int = 64, page_size: int = 16, max_seq_len: int | None = None,
                 num_pages: int | None = None, prefill_tokens: int = 8192, cuda_graphs: bool = True):
        config = model.config
        self.model = model
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        max_seq_len = max_seq_len or config.max_position_embeddings
        if not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
        scaling = config.rope_scaling or {}
        if scaling.get("type") == "dynamic" and max_seq_len > config.max_position_embeddings:
            raise NotImplementedError("rope_scaling type 'dynamic' beyond max_position_embeddings (its base would "
                                      "follow the sequence length, and the keys already cached keep the old base)")
        weight = model.output.weight
        self.device, self.dtype = weight.device, weight.dtype
        # Request lifecycle: FIFO queue -> a slot (with its pages) -> finished (or cancelled).
        self._slots: list[_Request | None] = [None] * max_batch
        self._queue: collections.deque[_Request] = collections.deque()
        self._zero_budget: list[_Request] = []       # finished on submission; reported by the next step
        self._next_id = 0
        self.max_batch, self.max_seq_len, self.prefill_tokens = max_batch, max_seq_len, prefill_tokens
        self.pages_per_seq = -(-max_seq_len // page_size)
        num_pages = num_pages or max_batch * self.pages_per_seq + 1
        # float32 on CPU under the cpu (or auto) attention/kvcache backend, as chosen when the generator is built:
        # keys/values per slot and the whole decode step as one function of plain ATen calls
        # (models/decode_step.py); the pool then only keeps the page bookkeeping.
        cpu_path = (self.device.type == "cpu" and self.dtype == torch.float32
                    and all(requested(op) in ("auto", "cpu") for op in ("attention", "kvcache")))
        self.pool = PagedKVPool(config.num_hidden_layers, num_pages, page_size, config.num_key_value_heads,
                                config.head_dim, self.dtype, self.device, storage=not cpu_path)
        # The tables cover the pool's capacity (whole pages); rows past max_seq_len are never read (every request fits
        # in max_seq_len) and stay zero: building them would re-base a dynamic-NTK table whose length passes
        # max_position_embeddings.
        pad = (0, 0, 0, self.pages_per_seq * page_size - max_seq_len)
        self.cos, self.sin = (F.pad(t, pad) for t in model.model.rotary(max_seq_len, self.device))
        # Decode-step inputs at fixed addresses (row r = slot r); padding rows point at the scratch page 0.
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.block_table = torch.zeros(max_batch, self.pages_per_seq, dtype=torch.int32, device=self.device)
        self.cache_seqlens = torch.zeros(max_batch, dtype=torch.int32, device=self.device)
        self.buckets = sorted({min(2 ** i, max_batch) for i in range(max_batch.bit_length() + 1)})
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._cpu_step = (CpuDecodeStep(model, max_batch, self.pages_per_seq * page_size, self.cos, self.sin)
                          if cpu_path else None)

    # ----------------------------------------------------------------------------------------------
    # Model steps
    # ----------------------------------------------------------------------------------------------
    def _prefill(self, batch: list[tuple[int, _Request]]) -> torch.Tensor:
        """Run the prompts of (slot, request) pairs packed; returns logits (n, V) float32 at their last tokens."""
        ids, lengths = [], []
        for _, req in batch:
            ids.extend(req.prompt)
            lengths.append(len(req.prompt))
        dev = self.device
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
        if self._cpu_step is not None:
            return self._cpu_step.prefill(ids_t, [slot for slot, _ in batch], lengths)
        cu_seqlens = F.pad(torch.tensor(lengths, device=dev).cumsum(0).to(torch.int32), (1, 0))
        ps = self.pool.page_size
        pages = [req.pages[p // ps] for _, req in batch for p in range(len(req.prompt))]
        offsets = [p % ps for _, req in batch for p in range(len(req.prompt))]
        writer = _PrefillWriter(self.pool, torch.tensor(pages, device=dev), torch.tensor(offsets, device=dev))
        packed = PackedInputs(ids_t, cu_seqlens, max(lengths), None, None, None)
        hidden = self.model.model(ids_t, PackedContext(packed, self.model.model.rotary, writer))
        return self.model.output(hidden[cu_seqlens[1:].long() - 1]).float()

    def _decode_eager(self, rows: int) -> torch.Tensor:
        if self._cpu_step is not None:
            return self._cpu_step.logits(rows, self.tokens, self.cache_seqlens)
        ctx = PagedDecodeContext(self.pool, self.block_table[:rows], self.cache_seqlens[:rows], self.cos, self.sin)
        hidden = self.model.model(self.tokens[:rows], ctx)
        return self.model.output(hidden).float()

    def _decode(self, rows: int) -> torch.Tensor:
        """Logits (rows, V) of the next token of rows 0..rows-1 (rows is a bucket)."""
        if not self.cuda_graphs:
            return self._decode_eager(rows)
        if rows not in self._graphs:
            # Warm up (compiles the kernels) off the capture; a decode step only rewrites the cache positions it
            # would write anyway, so running it here changes nothing.
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._decode_eager(rows)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._decode_eager(rows)
            self._graphs[rows] = (graph, logits)
        graph, logits = self._graphs[rows]
        graph.replay()
        return logits

    # ----------------------------------------------------------------------------------------------
    # Request lifecycle
    # ----------------------------------------------------------------------------------------------
    def submit(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, stop_token_ids=(2, 92542), generator: torch.Generator | None = None) -> int:
        """Queue one request; returns its id (what ``step`` reports it under). Arguments as ``generate``'s, for
        one prompt; ``generator`` seeds this request's sampling (None: torch's default generator)."""
        stop = _check_args([prompt], max_new_tokens, temperature, top_p, top_k, stop_token_ids,
                           self.model.config.vocab_size)
        self._check_fits(prompt, max_new_tokens, "prompt")
        return self._enqueue(list(prompt), max_new_tokens, Sampling(float(temperature), float(top_p), top_k),
                             generator if temperature > 0 else None, stop)

    def _check_fits(self, prompt: list[int], max_new: int, where: str) -> None:
        if len(prompt) + max_new > self.max_seq_len:
            raise ValueError(f"{where} ({len(prompt)} tokens) + max_new_tokens ({max_new}) exceeds max_seq_len="
                             f"{self.max_seq_len}")
        n_pages = -(-(len(prompt) + max_new) // self.pool.page_size)
        if n_pages > self.pool.capacity:
            raise ValueError(f"{where} needs {n_pages} pages but the pool has {self.pool.capacity}: raise num_pages")

    def _enqueue(self, prompt: list[int], max_new: int, sampling: Sampling, generator: torch.Generator | None,
                 stop) -> int:
        req = _Request(self._next_id, prompt, max_new, sampling, generator, frozenset(stop))
        self._next_id += 1
        (self._queue if max_new > 0 else self._zero_budget).append(req)
        return req.id

    def cancel(self, request_id: int) -> bool:
        """Drop a queued or running request (its slot and pages return now); False when it is not known (finished
        already). ``step`` reports nothing more for it."""
        for slot, req in enumerate(self._slots):
            if req is not None and req.id == request_id:
                self._free(slot)
                return True
        for req in self._queue:
            if req.id == request_id:
                self._queue.remove(req)
                return True
        return False

    @property
    def busy(self) -> bool:
        """Whether a request is queued or running (``step`` has work)."""
        return bool(self._queue or self._zero_budget or any(r is not None for r in self._slots))

    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    def _free(self, slot: int) -> None:
        self.pool.release(self._slots[slot].pages)
        self._slots[slot] = None
        self.block_table[slot].zero_()
        self.cache_seqlens[slot] = 0

    def _admit(self) -> list[tuple[int, _Request]]:
        """Move queued requests (in order) into free slots while pages and the prefill budget allow."""
        admitted: list[tuple[int, _Request]] = []
        prefill, free = 0, -1
        while self._queue:
            req = self._queue[0]
            # Slots only fill here, so the next free one is past the last one taken.
            free = next((s for s in range(free + 1, self.max_batch) if self._slots[s] is None), None)
            if free is None or (admitted and prefill + len(req.prompt) > self.prefill_tokens):
                break
            n_pages = -(-(len(req.prompt) + req.max_new) // self.pool.page_size)
            pages = self.pool.allocate(n_pages)
            if pages is None:
                break
            self._queue.popleft()
            req.pages = pages
            self._slots[free] = req
            admitted.append((free, req))
            prefill += len(req.prompt)
        if admitted:   # the block-table rows of every admitted request in one write
            rows = [req.pages + [0] * (self.pages_per_seq - len(req.pages)) for _, req in admitted]
            self.block_table[self._slot_index([slot for slot, _ in admitted])] = torch.tensor(
                rows, dtype=torch.int32, device=self.device)
        return admitted

    def _slot_index(self, slots: list[int]) -> torch.Tensor | slice:
        """Rows ``slots`` of the per-slot buffers: a slice when they are consecutive (no gather), else an index."""
        if all(b == a + 1 for a, b in zip(slots, slots[1:])):
            return slice(slots[0], slots[-1] + 1)
        return torch.tensor(slots, device=self.device)

    def _sample(self, slot_list: list[int], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row of ``logits`` (row i belongs to slot_list[i]), each request by its own Sampling and
        generator; the rows of one Sampling are sampled in one call (``sample``: each drawn from its generator)."""
        first = self._slots[slot_list[0]].sampling
        if all(self._slots[slot].sampling is first for slot in slot_list):      # one generate call's requests
            return sample(logits, first.temperature, first.top_p, first.top_k,
                          [self._slots[slot].generator for slot in slot_list])
        groups: dict[Sampling, list[int]] = {}
        for row, slot in enumerate(slot_list):
            groups.setdefault(self._slots[slot].sampling, []).append(row)
        if len(groups) == 1:
            (s, _), = groups.items()
            return sample(logits, s.temperature, s.top_p, s.top_k, [self._slots[slot].generator for slot in slot_list])
        tokens = torch.empty(len(slot_list), dtype=torch.long, device=logits.device)
        logprobs = torch.empty(len(slot_list), dtype=torch.float32, device=logits.device)
        for s, rows in groups.items():
            rows_t = torch.tensor(rows, device=logits.device)
            tokens[rows_t], logprobs[rows_t] = sample(logits[rows_t], s.temperature, s.top_p, s.top_k,
                                                      [self._slots[slot_list[r]].generator for r in rows])
        return tokens, logprobs

    def _take(self, slot_list: list[int], tokens: torch.Tensor, logprobs: torch.Tensor,
              out: dict[int, StepOutput]) -> None:
        """Record one sampled token per slot; finished requests leave, the others' next input is the token."""
        for slot, token, logprob in zip(slot_list, tokens.tolist(), logprobs.tolist()):
            req = self._slots[slot]
            req.tokens.append(token)
            req.logprobs.append(logprob)
            o = out.get(req.id)
            if o is None:
                o = out[req.id] = StepOutput(req.id, [], [])
            o.tokens.append(token)
            o.logprobs.append(logprob)
            if token in req.stop or len(req.tokens) == req.max_new:
                o.finish_reason = "stop" if token in req.stop else "length"
                self._free(slot)

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """Admit and prefill what fits, then one decode step for every running request. Returns what each
        request produced (requests that produced nothing are absent)."""
        out = {r.id: StepOutput(r.id, [], [], "length") for r in self._zero_budget}
        self._zero_budget.clear()
        admitted = self._admit()
        if admitted:
            slot_list = [slot for slot, _ in admitted]
            logits = self._prefill(admitted)
            tokens, logprobs = self._sample(slot_list, logits)
            at = self._slot_index(slot_list)
            self.cache_seqlens[at] = torch.tensor([len(req.prompt) for _, req in admitted], dtype=torch.int32,
                                                  device=self.device)
            self.tokens[at] = tokens
            self._take(slot_list, tokens, logprobs, out)
        live = [s for s, r in enumerate(self._slots) if r is not None]
        if live:
            rows = next(b for b in self.buckets if b > live[-1])
            live_t = self._slot_index(live)        # rows 0..n-1 (the usual case): a slice
            logits = self._decode(rows)
            tokens, logprobs = self._sample(live, logits[live_t])
            self.cache_seqlens[live_t] += 1       # the input token is now in the cache
            self.tokens[live_t] = tokens
            self._take(live, tokens, logprobs, out)
        return list(out.values())

    def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int], temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, stop_token_ids=(2, 92542),
                 generator: torch.Generator | Sequence[torch.Generator] | None = None) -> list[Completion]:
        """Completions of ``prompts`` in their order. ``max_new_tokens`` is one int or one per prompt. ``generator``
        (on the model's device) seeds the sampling: one for the call (every step draws the batch's tokens from it
        in slot order, so a reply depends on its neighbours), or one per prompt (each reply depends on its own
        generator alone: the same tokens whatever else is in the batch, as a 1-prompt call would give). Runs
        ``step`` until these requests finish (requests that were submitted before run alongside)."""
        stop = _check_args(prompts, max_new_tokens, temperature, top_p, top_k, stop_token_ids,
                           self.model.config.vocab_size)
        generators = _per_prompt(generator, len(prompts))
        if temperature == 0:                     # greedy draws nothing
            generators = [None] * len(prompts)
        budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        for i, (p, n) in enumerate(zip(prompts, budgets)):
            self._check_fits(p, n, f"prompts[{i}]")
        sampling = Sampling(float(temperature), float(top_p), top_k)
        ids = [self._enqueue(list(p), n, sampling, g, stop) for p, n, g in zip(prompts, budgets, generators)]
        index = {rid: i for i, rid in enumerate(ids)}
        results: list[Completion | None] = [None] * len(prompts)
        tokens: dict[int, tuple[list[int], list[float]]] = {rid: ([], []) for rid in ids}
        left = len(ids)
        try:
            while left:
                for o in self.step():
                    if o.request_id not in index:
                        continue
                    toks, lps = tokens[o.request_id]
                    toks += o.tokens
                    lps += o.logprobs
                    if o.finish_reason is not None:
                        results[index[o.request_id]] = Completion(toks, lps, o.finish_reason)
                        left -= 1
        except BaseException:          # interrupted: leave no request of this call behind in the engine
            for rid in ids:
                self.cancel(rid)
            raise
        return results


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int | list[int], temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, stop_token_ids=(2, 92542),
             generator: torch.Generator | Sequence[torch.Generator] | None = None) -> list[Completion]:
    """``ContinuousBatchingGenerator.generate`` on a generator built for this one call (``model.generate``): one slot
    per prompt and sequences of the longest prompt + budget, so the KV cache is allocated once, at the call's size.
    Decodes eagerly: a CUDA graph is captured per batch bucket and pays off over the many calls of a kept engine
    (the PPO Sampler's, the server's), not within one call."""
    _check_args(prompts, max_new_tokens, temperature, top_p, top_k, stop_token_ids, model.config.vocab_size)
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else max_new_tokens
    longest = max(len(p) + n for p, n in zip(prompts, budgets))
    engine = ContinuousBatchingGenerator(model, max_batch=len(prompts), max_seq_len=max(longest, 2),
                                         cuda_graphs=False)
    return engine.generate(prompts, max_new_tokens, temperature, top_p, top_k, stop_token_ids, generator)


def _per_prompt(generator, n: int) -> list[torch.Generator | None]:
    """``generate``'s ``generator`` as one per prompt (the same object n times when one is shared)."""
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * n
    if (not isinstance(generator, (list, tuple)) or len(generator) != n
            or not all(isinstance(g, torch.Generator) for g in generator)):
        raise ValueError(f"generator must be a torch.Generator, None, or a list of {n} torch.Generators (one per "
                         f"prompt), got {generator!r}")
    return list(generator)


def _check_args(prompts, max_new_tokens, temperature, top_p, top_k, stop_token_ids, vocab_size: int) -> tuple:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)) or not p:
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids")
        # Plain ints (the usual case) are checked by C loops (min, max); anything else token by token.
        plain = set(map(type, p)) == {int}
        if not (0 <= min(p) and max(p) < vocab_size if plain else
                all(isinstance(t, int) and 0 <= t < vocab_size for t in p)):
            raise ValueError(f"prompts[{i}] must hold ints in [0, vocab_size={vocab_size})")
    budgets = [max_new_tokens] if isinstance(max_new_tokens, int) else max_new_tokens
    if (not isinstance(budgets, (list, tuple)) or (not isinstance(max_new_tokens, int) and len(budgets) != len(prompts))
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in budgets)):
        raise ValueError(f"max_new_tokens must be an int >= 0 or one per prompt, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if temperature == 0 and (top_p != 1.0 or top_k != 0):
        raise ValueError("top_p and top_k apply to sampling; with temperature=0 (greedy) leave them at 1.0 and 0")
    stop_token_ids = tuple(stop_token_ids)
    if not all(isinstance(t, int) for t in stop_token_ids):
        raise ValueError(f"stop_token_ids must be ints, got {stop_token_ids!r}")
    return stop_token_ids
