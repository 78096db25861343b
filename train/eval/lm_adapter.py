"""Our checkpoints in lm-evaluation-harness: ``InternLMKernelsLM``, a ``TemplateLM`` on models/ and our kernels.

Registered with lm-eval as ``internlm_kernels`` when this module is imported (``python -m train.eval.lm_eval``
imports it and then runs lm-eval's own CLI; lm-eval 0.4.13 has no plugin discovery).

- ``loglikelihood``: requests run as **packed varlen batches** — no padding, ``cu_seqlens`` — and requests that
  share a context (the choices of a multiple-choice question) share it: the context's tokens run once, and each
  continuation runs as its own segment whose queries attend to the context's keys and values plus its own
  (causal attention with fewer queries than keys is bottom-right aligned, so a segment of n continuation tokens
  over c + n keys is exactly the last n rows of the unshared sequence). Positions continue after the context.
  The output head runs only at the rows that predict a continuation token. Numbers equal lm-eval's ``hf`` model
  on the same checkpoint up to float rounding: same tokens in, same sum of log-softmax out.
- ``loglikelihood_rolling``: lm-eval's rolling windows (``get_rolling_token_windows`` + ``make_disjoint_window``,
  the first predicted from ``prefix_token_id`` = ``<s>``), each scored as above; every token is scored once.
- ``generate_until``: greedy (or sampled) completions on ``models.serving.ContinuousBatchingGenerator``, stopped
  at ``</s>`` and at any ``until`` string that is one token; the text is cut at the first ``until`` string.

The tokenizer is the one the checkpoint was trained with (``tokenizer.json`` record beside or inside the export,
or the export's ``tokenizer.model``), or ``tokenizer=byte|PATH``. ``add_bos_token`` (default True: the models
are trained on ``<s>``-prefixed documents) matches ``hf``'s option of the same name.
"""
from __future__ import annotations

import os
from typing import Sequence

import lm_eval.models  # noqa: F401  (lm-eval's own models first: its registry loads them only while empty)
import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from models import InternLM2ForCausalLM
from train.data.tokenizer import BOS, Tokenizer
from train.eval.loading import load_export


# --------------------------------------------------------------------------------------------------------------
# Packed scoring with shared contexts
# --------------------------------------------------------------------------------------------------------------
class SharedContextAttention:
    """ForwardContext of a packed batch of segments: each segment's queries attend causally (bottom-right
    aligned) to the keys at ``key_index`` of its rows — its own tokens, preceded for a continuation segment by
    its context segment's. Rotary positions are per token (a continuation continues its context's)."""

    def __init__(self, rotary, positions: torch.Tensor, cu_q: torch.Tensor, key_index: torch.Tensor | None,
                 cu_k: torch.Tensor, max_q: int, max_k: int):
        cos, sin = rotary(max_k, positions.device)
        self.cos, self.sin = cos[positions], sin[positions]      # (T, D/2): row i rotates token i
        self.cu_q, self.cu_k, self.key_index = cu_q, cu_k, key_index
        self.max_q, self.max_k = max_q, max_k

    def qkv(self, wqkv_out: torch.Tensor, n_kv_heads: int, head_dim: int):
        import internlm_kernels as ik

        q, k, v = ik.qkv_rotary(wqkv_out.unsqueeze(0), self.cos, self.sin, n_kv_heads, head_dim)
        return q[0], k[0], v[0]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        import internlm_kernels as ik

        if self.key_index is not None:
            k, v = k[self.key_index], v[self.key_index]
        return ik.flash_attn_varlen_func(q, k, v, self.cu_q, self.cu_k, self.max_q, self.max_k, causal=True)


class _Batch:
    """Segments being packed: token ids, positions, the keys each segment sees, and the rows to score."""

    def __init__(self):
        self.ids: list[int] = []
        self.positions: list[int] = []
        self.q_lens: list[int] = []
        self.key_index: list[int] = []
        self.k_lens: list[int] = []
        self.shared = False
        self.rows: list[int] = []          # hidden rows whose next-token distribution is scored
        self.targets: list[int] = []
        self.owner: list[int] = []         # request index of each scored row

    def segment(self, ids: Sequence[int], start_pos: int, context_rows: Sequence[int] = ()) -> int:
        """Append a segment (its queries see ``context_rows`` then itself); returns its first row."""
        first = len(self.ids)
        self.ids += ids
        self.positions += range(start_pos, start_pos + len(ids))
        self.q_lens.append(len(ids))
        self.key_index += list(context_rows) + list(range(first, first + len(ids)))
        self.k_lens.append(len(context_rows) + len(ids))
        self.shared |= bool(context_rows)
        return first

    def score(self, rows: Sequence[int], targets: Sequence[int], owner: int) -> None:
        self.rows += rows
        self.targets += targets
        self.owner += [owner] * len(rows)


@torch.no_grad()
def _run(model: InternLM2ForCausalLM, batch: _Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability, is-argmax) of each scored row's target, float32 on the host."""
    ids = torch.tensor(batch.ids, dtype=torch.long, device=device)
    positions = torch.tensor(batch.positions, dtype=torch.long, device=device)
    cu_q = F.pad(torch.tensor(batch.q_lens).cumsum(0), (1, 0)).to(torch.int32).to(device)
    if batch.shared:
        cu_k = F.pad(torch.tensor(batch.k_lens).cumsum(0), (1, 0)).to(torch.int32).to(device)
        key_index = torch.tensor(batch.key_index, dtype=torch.long, device=device)
    else:
        cu_k, key_index = cu_q, None
    ctx = SharedContextAttention(model.model.rotary, positions, cu_q, key_index, cu_k, max(batch.q_lens),
                                 max(batch.k_lens))
    hidden = model.model(ids, ctx)                                              # (T, hidden)
    rows = torch.tensor(batch.rows, dtype=torch.long, device=device)
    targets = torch.tensor(batch.targets, dtype=torch.long, device=device)
    logits = model.output(hidden[rows]).float()                                 # (R, V)
    logp = torch.log_softmax(logits, dim=-1)
    token_logp = logp.gather(1, targets[:, None]).squeeze(1)
    greedy = logits.argmax(dim=-1) == targets
    return token_logp.cpu(), greedy.cpu()


def score_requests(model: InternLM2ForCausalLM, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                   max_length: int, device: torch.device, batch_tokens: int = 8192,
                   share_contexts: bool = True) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether every continuation token is the argmax) per
    (context ids, continuation ids) request, as lm-eval's ``hf``: the model reads (context + continuation)
    [-(max_length + 1):][:-1] and the last len(continuation) rows are scored (module docstring)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    single: list[int] = []
    for i, (ctx, cont) in enumerate(requests):
        if not cont or not ctx:
            raise ValueError(f"requests[{i}]: empty {'continuation' if not cont else 'context'} (lm-eval replaces an "
                             "empty context by prefix_token_id)")
        if share_contexts and len(ctx) + len(cont) <= max_length + 1:
            groups.setdefault(tuple(ctx), []).append(i)
        else:
            single.append(i)
    units: list[list[int]] = []
    for members in groups.values():
        if len(members) == 1:
            single.append(members[0])
        else:
            units.append(members)
    units += [[i] for i in single]
    # Longest first (lm-eval's order too): a batch's first unit shows the largest size early.
    units.sort(key=lambda u: -sum(len(requests[i][0]) + len(requests[i][1]) for i in u))
    sums = [0.0] * len(requests)
    greedy = [True] * len(requests)
    batch, size = _Batch(), 0

    def flush():
        nonlocal batch, size
        if not batch.rows:
            return
        logp, hit = _run(model, batch, device)
        for owner, lp, h in zip(batch.owner, logp.tolist(), hit.tolist()):
            sums[owner] += lp
            greedy[owner] &= h
        batch, size = _Batch(), 0

    for unit in units:
        if len(unit) == 1:
            ctx, cont = requests[unit[0]]
            seq = (list(ctx) + list(cont))[-(max_length + 1):]
            cost = len(seq) - 1
        else:
            ctx = requests[unit[0]][0]
            cost = len(ctx) + sum(len(requests[i][1]) - 1 for i in unit)
        if size and size + cost > batch_tokens:
            flush()
        size += cost
        if len(unit) == 1:
            n = len(requests[unit[0]][1])
            first = batch.segment(seq[:-1], 0)
            last = first + len(seq) - 2
            batch.score(range(last - n + 1, last + 1), seq[-n:], unit[0])
            continue
        first = batch.segment(list(ctx), 0)
        ctx_rows = range(first, first + len(ctx))
        for i in unit:
            cont = list(requests[i][1])
            rows = [first + len(ctx) - 1]
            if len(cont) > 1:
                start = batch.segment(cont[:-1], len(ctx), ctx_rows)
                rows += range(start, start + len(cont) - 1)
            batch.score(rows, cont, i)
    flush()
    return list(zip(sums, greedy))


def rolling_windows(ids: Sequence[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows of a text's ids: (context, continuation) pairs whose continuations
    concatenate to ``ids`` (every token scored once, the first predicted from ``prefix``), each window at most
    ``max_length`` model inputs, later windows conditioned on up to max_length - n preceding tokens.

    The text is encoded without ``<s>``: the prefix token is the ``<s>``. (lm-eval's ``hf`` encodes it with its
    ``add_bos_token`` setting, so with add_bos_token=True it also scores ``<s>`` after ``<s>``.)"""
    return [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
        token_list=list(ids), prefix_token=prefix, max_seq_len=max_length, context_len=1)]


# --------------------------------------------------------------------------------------------------------------
# The lm-eval model
# --------------------------------------------------------------------------------------------------------------
@register_model("internlm_kernels")
class InternLMKernelsLM(TemplateLM):
    """``--model internlm_kernels --model_args pretrained=DIR[,dtype=...,max_length=...,tokenizer=...,
    batch_tokens=...,add_bos_token=...,share_contexts=...,max_gen_toks=...,threads=...]`` (module docstring).

    pretrained: an export directory, or an InternLM2ForCausalLM (then ``tokenizer`` is its Tokenizer object);
    dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16; max_length: the longest input
    (default: the config's max_position_embeddings, as hf); batch_tokens: packed tokens per forward;
    share_contexts: run a context shared by several requests once; threads: torch CPU threads.
    lm-eval's CLI also passes device, batch_size (checked, otherwise unused: batches are packed by tokens) and
    max_batch_size (the generator's decode slots, default 64)."""

    ARGS = ("pretrained", "dtype", "max_length", "tokenizer", "batch_tokens", "add_bos_token", "share_contexts",
            "max_gen_toks", "threads", "device", "batch_size", "max_batch_size")

    def __init__(self, pretrained: str | InternLM2ForCausalLM | None = None, dtype: str = "auto",
                 max_length: int | None = None, tokenizer: str | Tokenizer | None = None, batch_tokens: int = 8192,
                 add_bos_token: bool = True, share_contexts: bool = True, max_gen_toks: int = 256,
                 threads: int | None = None, device: str | None = None, batch_size: int | str | None = None,
                 max_batch_size: int | None = None,
                 **unknown):
        if unknown:
            names = ", ".join(sorted(unknown))
            raise ValueError(f"model_args: unknown key(s) {names} for internlm_kernels (known: {', '.join(self.ARGS)})")
        super().__init__()
        for name, value in (("max_length", max_length), ("batch_tokens", batch_tokens), ("max_gen_toks", max_gen_toks)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name, value in (("add_bos_token", add_bos_token), ("share_contexts", share_contexts)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if batch_size is not None and not (str(batch_size).startswith("auto") or str(batch_size).isdigit()):
            raise ValueError(f"batch_size must be an int or 'auto', got {batch_size!r}")
        if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                           or max_batch_size < 1):
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise ValueError(f"threads must be an int >= 1, got {threads!r}")
            # On a busy CPU, torch's OpenMP threads spin-wait on each other: one thread is often much faster.
            torch.set_num_threads(threads)
        if pretrained is None:
            raise ValueError("model_args: pretrained=DIR (an exported checkpoint directory) is required")
        if isinstance(pretrained, InternLM2ForCausalLM):
            if tokenizer is None or isinstance(tokenizer, str):
                raise ValueError("tokenizer: a model object needs its Tokenizer object")
            self.model, self.tok = pretrained.eval(), tokenizer
            self._device = next(pretrained.parameters()).device
        else:
            if not isinstance(pretrained, str) or not os.path.isdir(pretrained):
                raise ValueError(f"pretrained: {pretrained!r} is not a checkpoint directory")
            if tokenizer is not None and not isinstance(tokenizer, str):
                raise ValueError("tokenizer: 'byte' or a SentencePiece model path with pretrained=DIR")
            self.model, self.tok, self._device = load_export(pretrained, tokenizer, device, str(dtype))
        self._max_length = max_length or self.model.config.max_position_embeddings
        self.batch_tokens, self.add_bos_token, self.share_contexts = batch_tokens, add_bos_token, share_contexts
        self.max_gen_toks = max_gen_toks
        # Requests are packed by tokens (batch_tokens), so lm-eval's batch_size (1 unless given) sizes nothing here;
        # max_batch_size bounds the generator's decode slots.
        self.gen_batch = max_batch_size or 64
        self.special = set(self.tok.special_ids.values())

    # lm-eval's interface ------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is replaced by (and rolling windows start from): ``<s>``, as in training."""
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return type(self.tok).__name__

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and string.startswith(BOS):   # as hf: text that starts with <s> has its own
            add_bos = False
        ids = self.tok.encode(string, add_bos=add_bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        """Special tokens dropped, as ``hf`` decodes generations (skip_special_tokens=True)."""
        return self.tok.decode([i for i in ids if i not in self.special])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = score_requests(self.model, [(ctx, cont) for _, ctx, cont in requests], self.max_length,
                                 self.device, self.batch_tokens, self.share_contexts)
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log p over each whole text, in lm-eval's disjoint rolling windows of at most max_length."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in rolling_windows(self.tok_encode(string, add_special_tokens=False), self.prefix_token_id,
                                             self.max_length):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows)
        out = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            out[i] += ll
        for req, ll in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, ll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Completions of each context until any ``until`` string (or ``</s>``), greedy unless the task asks for
        sampling; requests with the same stop rule and sampling run together on the continuous-batching
        generator."""
        from models.serving import ContinuousBatchingGenerator

        groups: dict[tuple, list[int]] = {}
        prompts, budgets = [], []
        for i, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            top_p = float(kwargs.pop("top_p", 1.0)) if do_sample else 1.0
            top_k = int(kwargs.pop("top_k", 0) or 0) if do_sample else 0
            ids = self.tok_encode(context, left_truncate_len=self.max_length - max_new)
            prompts.append(ids)
            budgets.append(max_new)
            groups.setdefault((tuple(until), temperature, top_p, top_k), []).append(i)
        out = [""] * len(requests)
        for (until, temperature, top_p, top_k), members in groups.items():
            stop = {self.eot_token_id}
            stop |= {ids[0] for s in until if len(ids := self.tok.encode(s)) == 1}
            longest = max(len(prompts[i]) + budgets[i] for i in members)
            seeded = torch.Generator(self.device).manual_seed(0)   # sampled tasks: reproducible runs
            gen = ContinuousBatchingGenerator(self.model, max_batch=min(self.gen_batch, len(members)),
                                              max_seq_len=max(longest, 2), page_size=64)
            completions = gen.generate([prompts[i] for i in members], [budgets[i] for i in members],
                                       temperature=temperature, top_p=top_p, top_k=top_k,
                                       stop_token_ids=tuple(sorted(stop)),
                                       generator=None if temperature == 0 else seeded)
            for i, c in zip(members, completions):
                text = self.tok_decode(c.tokens)
                for s in until:
                    if s:
                        text = text.split(s)[0]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out
