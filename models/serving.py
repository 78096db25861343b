"""Continuous-batching generation over a paged KV cache: the rollout engine for RLHF.

- **Paged KV pool**: per layer one (num_pages, page_size, Hkv, D) tensor for keys and one for values. A request gets
  the pages for its prompt and its token budget when it is admitted (no preemption: admission waits while pages are
  short) and returns them when it finishes. Page 0 is a scratch page that the padding rows of a decode batch write to.
- **Slots**: a fixed number (``max_batch``) of decode rows; a request occupies the lowest free slot, so the live rows
  sit at the front and the decode batch is the smallest bucket (1, 2, 4, ..., max_batch) covering them.
- **Prefill**: the prompts admitted together are packed (T,) with cu_seqlens and run through the model's ordinary
  packed forward (varlen flash attention, positions restarting per prompt); each layer writes its rotated k/v into
  the prompts' pages. The head runs only at each prompt's last token.
- **Decode**: one token per slot; every layer makes one ``ik.flash_attn_with_kvcache`` call for the whole batch,
  which rotates q and the new k, appends k/v into the pages and attends over them (split-KV kernel on GPU). The step
  reads only fixed-address buffers (tokens, block table, cache lengths, all sized max_batch) and its shapes depend
  only on the bucket, so on CUDA it is captured once per bucket as a CUDA graph and replayed (``cuda_graphs``).
- **Refill**: after each step finished requests free their slot and pages, and queued prompts are admitted and
  prefilled at once.
- **Sampling**: greedy (temperature 0), or softmax(logits / T) restricted to the top-k tokens and then to the top-p
  nucleus, drawn with the caller's seeded ``torch.Generator``. Each sampled token's log-probability under
  softmax(logits / T) (T = 1 for greedy) is returned with it — what the PPO update recomputes with
  ``ik.fused_linear_logprobs(..., temperature=T)``.
- A request ends after a stop token (kept) or its max_new_tokens. Dynamic NTK RoPE is used only within
  max_position_embeddings (where it equals plain RoPE); a longer pool raises NotImplementedError.
"""
from __future__ import annotations

import collections
import dataclasses
import math

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
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) float32 -> (tokens (B,) int64, their log-probabilities (B,) under softmax(logits / T))."""
    scaled = logits / temperature if temperature > 0 else logits
    logp = torch.log_softmax(scaled, dim=-1)
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        probs = logp.exp()
        if top_k > 0 and top_k < probs.shape[-1]:
            kth = probs.topk(top_k, dim=-1).values[:, -1:]
            probs = probs.masked_fill(probs < kth, 0.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Drop a token when the tokens ranked above it already reach top_p; the most likely one always stays.
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
            choice = torch.multinomial(sorted_probs.masked_fill(outside, 0.0), 1, generator=generator)
            tokens = order.gather(-1, choice).squeeze(-1)
        else:
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


@dataclasses.dataclass
class _Request:
    index: int                 # position in the caller's prompt list
    prompt: list[int]
    max_new: int
    pages: list[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)


class ContinuousBatchingGenerator:
    """Generation for many prompts with a paged KV pool and continuous batching (see the module docstring).

    ``max_batch`` decode slots; ``max_seq_len`` bounds prompt + new tokens of one request; ``num_pages`` (default:
    every slot at max_seq_len, plus the scratch page) sizes the pool; ``prefill_tokens`` bounds the prompt tokens
    of one prefill call (a longer prompt still runs, alone). ``cuda_graphs`` captures the decode step per batch
    bucket on CUDA (ignored on CPU).
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
                                      "follow the sequence length); use generation.generate")
        weight = model.output.weight
        self.device, self.dtype = weight.device, weight.dtype
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
        self.cos, self.sin = model.model.rotary(self.pages_per_seq * page_size, self.device)
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
        cu_seqlens = F.pad(torch.tensor(lengths, device=dev).cumsum(0).to(torch.int32), (1, 0))
        if self._cpu_step is not None:
            writer = self._cpu_step.writer([slot for slot, _ in batch], lengths)
        else:
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
    # The loop
    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int], temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, stop_token_ids=(2, 92542),
                 generator: torch.Generator | None = None) -> list[Completion]:
        """Completions of ``prompts`` in their order. ``max_new_tokens`` is one int or one per prompt; ``generator``
        (on the model's device) seeds the sampling."""
        config = self.model.config
        stop = set(_check_args(prompts, max_new_tokens, temperature, top_p, top_k, stop_token_ids, config.vocab_size))
        budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        for i, (p, n) in enumerate(zip(prompts, budgets)):
            if len(p) + n > self.max_seq_len:
                raise ValueError(f"prompts[{i}] ({len(p)} tokens) + max_new_tokens ({n}) exceeds max_seq_len="
                                 f"{self.max_seq_len}")
        results: list[Completion | None] = [None] * len(prompts)
        queue = collections.deque(i for i in range(len(prompts)))
        for i in list(queue):
            if budgets[i] == 0:
                results[i] = Completion([], [], "length")
        queue = collections.deque(i for i in queue if budgets[i] > 0)
        slots: list[_Request | None] = [None] * self.max_batch
        temperature, top_p = float(temperature), float(top_p)

        def finish(slot: int, reason: str) -> None:
            req = slots[slot]
            results[req.index] = Completion(req.tokens, req.logprobs, reason)
            self.pool.release(req.pages)
            slots[slot] = None
            self.block_table[slot].zero_()
            self.cache_seqlens[slot] = 0

        def take(slot_list: list[int], tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
            """Record one sampled token per slot; finished requests leave, the others' next input is the token."""
            for slot, token, logprob in zip(slot_list, tokens.tolist(), logprobs.tolist()):
                req = slots[slot]
                req.tokens.append(token)
                req.logprobs.append(logprob)
                if token in stop:
                    finish(slot, "stop")
                elif len(req.tokens) == req.max_new:
                    finish(slot, "length")

        while queue or any(s is not None for s in slots):
            # Admit queued prompts into free slots while pages and the prefill budget allow.
            admitted: list[tuple[int, _Request]] = []
            prefill = 0
            while queue:
                i = queue[0]
                free = next((s for s, r in enumerate(slots) if r is None), None)
                n_pages = -(-(len(prompts[i]) + budgets[i]) // self.pool.page_size)
                if free is None or (admitted and prefill + len(prompts[i]) > self.prefill_tokens):
                    break
                pages = self.pool.allocate(n_pages)
                if pages is None:
                    if not admitted and all(s is None for s in slots):
                        raise ValueError(f"prompts[{i}] needs {n_pages} pages but the pool has "
                                         f"{len(self.pool.free)} free: raise num_pages")
                    break
                queue.popleft()
                req = _Request(i, list(prompts[i]), budgets[i], pages)
                slots[free] = req
                row = torch.zeros(self.pages_per_seq, dtype=torch.int32)
                row[:n_pages] = torch.tensor(pages, dtype=torch.int32)
                self.block_table[free] = row.to(self.device)
                admitted.append((free, req))
                prefill += len(prompts[i])
            if admitted:
                logits = self._prefill(admitted)
                tokens, logprobs = sample(logits, temperature, top_p, top_k, generator)
                for (slot, req), token in zip(admitted, tokens):
                    self.cache_seqlens[slot] = len(req.prompt)
                    self.tokens[slot] = token
                take([slot for slot, _ in admitted], tokens, logprobs)
            live = [s for s, r in enumerate(slots) if r is not None]
            if not live:
                continue
            rows = next(b for b in self.buckets if b > live[-1])
            logits = self._decode(rows)
            tokens, logprobs = sample(logits[live], temperature, top_p, top_k, generator)
            live_t = torch.tensor(live, device=self.device)
            self.cache_seqlens[live_t] += 1       # the input token is now in the cache
            self.tokens[live_t] = tokens
            take(live, tokens, logprobs)
        return results


def _check_args(prompts, max_new_tokens, temperature, top_p, top_k, stop_token_ids, vocab_size: int) -> tuple:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)) or not p:
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids")
        if not all(isinstance(t, int) and 0 <= t < vocab_size for t in p):
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
