"""Plain-torch definitions of every op: the spec, the CPU path and the test oracle.

Written for clarity, not speed. Every function computes in float32 (or float64 when given float64)
and casts the result back to the input dtype, which is what the kernels do too. Autograd through these
functions is the reference backward.
"""
from __future__ import annotations

import math

import torch


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------
def attention_mask(seqlen_q: int, seqlen_k: int, causal: bool, window_size: tuple[int, int],
                   device=None) -> torch.Tensor:
    """Boolean (seqlen_q, seqlen_k) mask, True where query i may attend key j.

    flash-attn semantics: queries are aligned to the bottom-right of the key range, so query i sits at
    key position ``i + seqlen_k - seqlen_q``. With window (left, right), key j is visible when
    ``pos - left <= j <= pos + right`` (-1 means unbounded on that side). ``causal`` sets right = 0.
    """
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    pos = i + seqlen_k - seqlen_q
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        mask &= j <= pos + right
    if left >= 0:
        mask &= j >= pos - left
    return mask


def attention_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                  causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                  alibi_slopes: torch.Tensor | None = None, dropout_p: float = 0.0,
                  dropout_keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one sequence. q (Lq, Hq, D), k/v (Lk, Hkv, D) -> out (Lq, Hq, D), lse (Hq, Lq) float32.

    s = scale · q kᵀ;  s = softcap · tanh(s / softcap) if softcap > 0;  s -= slope_h · |pos_i - j| with ALiBi;
    masked entries are -inf;  lse = log Σ_j exp(s_ij);  out = softmax(s) v.
    Query head h reads key/value head h // (Hq / Hkv) (grouped-query attention).
    A query row that sees no key gets out = 0 and lse = +inf (as flash-attn).
    Dropout: with ``dropout_keep`` (Hq, Lq, Lk) bool, out = (p · keep / (1 - dropout_p)) v; lse is unchanged.
    """
    Lq, Hq, D = q.shape
    Lk, Hkv, _ = k.shape
    group = Hq // Hkv
    dt = _compute_dtype(q)
    qf = q.to(dt).transpose(0, 1)                                         # (Hq, Lq, D)
    kf = k.to(dt).transpose(0, 1).repeat_interleave(group, dim=0)         # (Hq, Lk, D)
    vf = v.to(dt).transpose(0, 1).repeat_interleave(group, dim=0)         # (Hq, Lk, D)
    s = softmax_scale * (qf @ kf.transpose(1, 2))                         # (Hq, Lq, Lk)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        pos = torch.arange(Lq, device=q.device)[:, None] + Lk - Lq
        dist = (pos - torch.arange(Lk, device=q.device)[None, :]).abs().to(dt)
        s = s - alibi_slopes.to(dt).reshape(Hq, 1, 1) * dist
    mask = attention_mask(Lq, Lk, causal, window_size, device=q.device)  # (Lq, Lk)
    empty = ~mask.any(dim=1)                                              # (Lq,)
    # Rows with no visible key are filled with zeros so that neither softmax nor its gradient is NaN;
    # their probabilities are then zeroed by the mask.
    s = s.masked_fill(~mask, float("-inf")).masked_fill(empty[:, None], 0.0)
    lse = torch.logsumexp(s, dim=-1)                                      # (Hq, Lq)
    p = torch.exp(s - lse[..., None]) * mask
    if dropout_keep is not None:
        p = p * dropout_keep / (1.0 - dropout_p)
    out = (p @ vf).transpose(0, 1)                                        # (Lq, Hq, D)
    lse = lse.float().masked_fill(empty, float("inf"))
    return out.to(q.dtype), lse


def flash_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                      softmax_scale: float | None = None, causal: bool = False,
                      window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                      alibi_slopes: torch.Tensor | None = None, dropout_p: float = 0.0,
                      dropout_keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length attention over packed sequences: sequence b owns query rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and key rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``; no attention
    crosses sequences. q (total_q, Hq, D), k/v (total_k, Hkv, D) -> out (total_q, Hq, D),
    lse (Hq, total_q) float32. ``alibi_slopes`` is (Hq,) or (batch, Hq). With ``dropout_p`` > 0, ``dropout_keep``
    (Hq, total_q, >= max key length) bool says which weights survive: sequence b uses
    ``dropout_keep[:, cu_seqlens_q[b]:cu_seqlens_q[b+1], :Lk_b]``. See ``attention_one``.
    """
    if dropout_p > 0 and dropout_keep is None:
        raise ValueError("dropout_p > 0 needs dropout_keep (the reference draws no random numbers itself)")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes
        keep = None
        if dropout_p > 0:
            keep = dropout_keep[:, cq[b]:cq[b + 1], :ck[b + 1] - ck[b]]
        o, lse_b = attention_one(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], softmax_scale,
                             causal, window_size, softcap, slopes, dropout_p, keep)
        outs.append(o)
        lses.append(lse_b)
    out = torch.cat(outs, dim=0) if outs else q.new_empty(q.shape)
    lse = torch.cat(lses, dim=1) if lses else q.new_empty(q.shape[1], 0, dtype=torch.float32)
    return out, lse


def paged_positions(block_table: torch.Tensor | None, page_size: int, batch_row: int, positions: torch.Tensor):
    """Where cache positions of one sequence live: (page or batch row index, row inside it) per position. Without a
    block table the cache is contiguous and position p of cache row ``batch_row`` is ``cache[batch_row, p]``;
    with one, position p is ``cache[block_table[batch_row, p // page_size], p % page_size]``."""
    if block_table is None:
        return torch.full_like(positions, batch_row), positions
    return block_table[batch_row].long()[positions // page_size], positions % page_size


def flash_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                            rotary_cos: torch.Tensor | None = None, rotary_sin: torch.Tensor | None = None,
                            cache_seqlens: torch.Tensor | None = None, cache_batch_idx: torch.Tensor | None = None,
                            cache_leftpad: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                            softmax_scale: float | None = None, causal: bool = False,
                            window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True,
                            alibi_slopes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of new queries over a KV cache, appending new keys/values first (flash-attn semantics).

    q (B, Sq, Hq, D). Contiguous cache: k_cache/v_cache (B_cache, S_cache, Hkv, D), sequence b in cache row
    ``cache_batch_idx[b]`` (default b). Paged cache: (num_pages, page_size, Hkv, D) with ``block_table`` (B, pages)
    int32: position p of sequence b is row p % page_size of page block_table[b, p // page_size].
    ``cache_seqlens`` (B,) int32 (or an int for all): keys already in the cache. New k/v (B, Snew, Hkv, D) are
    written at positions cache_seqlens[b] .. + Snew - 1 (in place), rotated first when rotary_cos/sin
    (seqlen_ro, rotary_dim / 2) are given; q is then rotated at positions cache_seqlens[b] + i when causal or
    windowed, else every query token at position cache_seqlens[b]. Each query then attends to the cache's keys
    ``cache_leftpad[b] <= j < L_b = cache_seqlens[b] + Snew`` with query i at key position i + L_b - Sq
    (bottom-right), masked by causal / window_size, softcapped and ALiBi-biased as ``attention_one``.
    Returns out (B, Sq, Hq, D) and lse (B, Hq, Sq) float32 (+inf for a query that sees no key).
    """
    B, Sq, Hq, D = q.shape
    if softmax_scale is None:
        softmax_scale = D ** -0.5
    if cache_seqlens is None:
        cache_seqlens = 0
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    n_new = 0 if k is None else k.shape[1]
    page_size = k_cache.shape[1]
    local = causal or window_size[0] >= 0 or window_size[1] >= 0
    outs, lses = [], []
    for b in range(B):
        row = b if cache_batch_idx is None else int(cache_batch_idx[b])
        start = int(cache_seqlens[b])
        length = start + n_new
        if k is not None:
            new_pos = torch.arange(start, length, device=q.device)
            k_b, v_b = k[b:b + 1], v[b:b + 1]
            if rotary_cos is not None:
                k_b = apply_rotary_emb(k_b, rotary_cos, rotary_sin, rotary_interleaved, seqlen_offsets=start)
            where = paged_positions(block_table, page_size, row, new_pos)
            k_cache[where] = k_b[0]
            v_cache[where] = v_b[0]
        q_b = q[b:b + 1]
        if rotary_cos is not None and k is not None:
            if local:
                q_b = apply_rotary_emb(q_b, rotary_cos, rotary_sin, rotary_interleaved, seqlen_offsets=start)
            else:  # every query token at the position of the first new key
                q_b = apply_rotary_emb(q_b.reshape(1, 1, Sq * Hq, D), rotary_cos, rotary_sin, rotary_interleaved,
                                       seqlen_offsets=start).reshape(1, Sq, Hq, D)
        first = 0 if cache_leftpad is None else int(cache_leftpad[b])
        where = paged_positions(block_table, page_size, row, torch.arange(first, length, device=q.device))
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes
        # Keys before the left padding are dropped; bottom-right alignment then counts the remaining L_b - first.
        o, lse = attention_one(q_b[0], k_cache[where], v_cache[where], softmax_scale, causal, window_size, softcap,
                               slopes)
        outs.append(o)
        lses.append(lse)
    out = torch.stack(outs) if outs else q.new_empty(q.shape)
    lse = torch.stack(lses) if lses else q.new_empty((0, Hq, Sq), dtype=torch.float32)
    return out, lse


def flash_attn_varlen_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, block_table: torch.Tensor,
                            softmax_scale: float | None = None, causal: bool = False,
                            window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            alibi_slopes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``flash_attn_varlen`` whose keys/values live in a paged cache (flash-attn >= 2.5's ``block_table``): the
    keys of sequence b are its first cu_seqlens_k[b+1] - cu_seqlens_k[b] cache positions (see
    ``paged_positions``). Returns out (total_q, Hq, D), lse (Hq, total_q) float32."""
    ck = cu_seqlens_k.tolist()
    page_size = k_cache.shape[1]
    rows = [paged_positions(block_table, page_size, b, torch.arange(ck[b + 1] - ck[b], device=q.device))
            for b in range(len(ck) - 1)]
    pages = torch.cat([r[0] for r in rows]) if rows else torch.zeros(0, dtype=torch.long, device=q.device)
    offsets = torch.cat([r[1] for r in rows]) if rows else pages
    return flash_attn_varlen(q, k_cache[pages, offsets], v_cache[pages, offsets], cu_seqlens_q, cu_seqlens_k,
                             softmax_scale, causal, window_size, softcap, alibi_slopes)


# --------------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None,
             prenorm: bool = False, residual_in_fp32: bool = False, offset: float = 0.0,
             casting_mode: str = "gemma"):
    """RMSNorm with an optional fused residual add (flash-attn ``rms_norm_fn`` semantics, no bias).

    h = x + residual (in float32; h = x without a residual);
    y = h / sqrt(mean(h², last dim) + eps) · weight, computed in float32 and returned in x.dtype.
    With ``prenorm`` returns (y, h) where h is stored in residual.dtype if a residual was given, else
    float32 if ``residual_in_fp32`` else x.dtype — the carried residual stream of a pre-norm block.
    The weight is ``weight + offset`` (Gemma: offset 1). casting_mode "gemma": all in float32, rounded once;
    "llama": the normalized row is rounded to x.dtype before the weight multiplies it (transformers' LlamaRMSNorm);
    "none" (Liger's): the statistics and the scaling in x.dtype, each step rounded to it — see
    ``rms_norm_low_precision``.
    """
    if casting_mode == "none":
        return rms_norm_low_precision(x, weight, eps, residual, prenorm, residual_in_fp32, offset)
    dt = _compute_dtype(x)
    h = x.to(dt)
    if residual is not None:
        h = h + residual.to(dt)
    n = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    if casting_mode == "llama":
        n = n.to(x.dtype).to(dt)
    y = (n * (weight.to(dt) + offset)).to(x.dtype)
    if not prenorm:
        return y
    return y, h.to(_carried_dtype(x, residual, residual_in_fp32))


def _carried_dtype(x: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool) -> torch.dtype:
    if residual is not None:
        return residual.dtype
    return torch.float32 if residual_in_fp32 else x.dtype


def rms_norm_low_precision(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                           residual: torch.Tensor | None = None, prenorm: bool = False,
                           residual_in_fp32: bool = False, offset: float = 0.0):
    """RMSNorm with casting_mode "none": every intermediate rounded to t = x.dtype (arithmetic in float32):

        h = round_t(x + residual),  ms = round_t(mean(round_t(h²))),  r = round_t(1 / sqrt(round_t(ms + eps))),
        n = round_t(h · r),  y = round_t(n · round_t(weight + offset))

    — the statistics and the scaling in the input dtype (Liger's "none"), the steps of ``h * torch.rsqrt(h.pow(2)
    .mean(-1, keepdim=True) + eps) * weight`` run in bf16, with the roundings placed once and for all (ATen's 16-bit
    ops may round at other points inside them, e.g. within the mean). In float32 it is the "gemma" result up to
    float32 rounding. The gradient is autograd's through these roundings.
    """
    t = x.dtype
    f = _compute_dtype(x)

    def rnd(v: torch.Tensor) -> torch.Tensor:
        return v.to(t).to(f)

    summed = x.to(f) if residual is None else x.to(f) + residual.to(f)
    h = rnd(summed)
    ms = rnd(rnd(h * h).mean(dim=-1, keepdim=True))
    r = rnd(torch.rsqrt(rnd(ms + eps)))
    y = (rnd(h * r) * rnd(weight.to(f) + offset)).to(t)
    if not prenorm:
        return y
    return y, summed.to(_carried_dtype(x, residual, residual_in_fp32))


# --------------------------------------------------------------------------------------------------
# SwiGLU
# --------------------------------------------------------------------------------------------------
def swiglu(gate: torch.Tensor, up: torch.Tensor, gate_multiplier: float = 1.0,
           down_multiplier: float = 1.0) -> torch.Tensor:
    """silu(m_g · gate) · up · m_d, in float32, returned in gate.dtype (m_g, m_d: the gate and down multipliers of
    Liger's LigerSiLUMulFunction / Falcon-H1's MLP; silu(a) = a · sigmoid(a))."""
    dt = _compute_dtype(gate)
    g = gate.to(dt) * gate_multiplier
    return (g * torch.sigmoid(g) * up.to(dt) * down_multiplier).to(gate.dtype)


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU of one tensor holding [gate | up] halves on its last dim (the output of a fused w1/w3 matmul)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu(gate, up)


# --------------------------------------------------------------------------------------------------
# Rotary embedding
# --------------------------------------------------------------------------------------------------
def rotary_positions(x: torch.Tensor, seqlen_offsets: int | torch.Tensor = 0,
                     cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Position of each token: (B, S) for x (B, S, H, D), or (total,) for packed x with cu_seqlens, where
    positions restart at 0 in each sequence. ``seqlen_offsets`` (int, or (B,) tensor) is added per sequence."""
    if cu_seqlens is None:
        B, S = x.shape[:2]
        pos = torch.arange(S, device=x.device)[None, :].expand(B, S)
        offs = seqlen_offsets if isinstance(seqlen_offsets, int) else seqlen_offsets.to(x.device)[:, None]
        return pos + offs
    cu = cu_seqlens.tolist()
    pos = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for b in range(len(cu) - 1):
        off = seqlen_offsets if isinstance(seqlen_offsets, int) else int(seqlen_offsets[b])
        pos[cu[b]:cu[b + 1]] = torch.arange(cu[b + 1] - cu[b], device=x.device) + off
    return pos


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
                     seqlen_offsets: int | torch.Tensor = 0, cu_seqlens: torch.Tensor | None = None,
                     conjugate: bool = False) -> torch.Tensor:
    """Rotary embedding (flash-attn ``apply_rotary_emb`` semantics).

    x (B, S, H, D), or (total, H, D) with cu_seqlens; cos/sin (seqlen_ro, rotary_dim / 2).
    The first rotary_dim features rotate, the rest pass through. With c = cos[pos], s = sin[pos]:
      rotate-half (InternLM2, Llama):  x1, x2 = x[:rd/2], x[rd/2:rd]   -> (x1 c - x2 s, x1 s + x2 c)
      interleaved (GPT-J):             x1, x2 = x[0:rd:2], x[1:rd:2]   -> same, written back interleaved.
    ``conjugate`` rotates by -angle (the backward of the forward rotation).
    """
    dt = _compute_dtype(x)
    rd = cos.shape[-1] * 2
    pos = rotary_positions(x, seqlen_offsets, cu_seqlens)                # (B, S) or (total,)
    c = cos.to(dt)[pos].unsqueeze(-2)                                      # (..., 1, rd/2)
    s = sin.to(dt)[pos].unsqueeze(-2)
    if conjugate:
        s = -s
    xf = x.to(dt)
    xr, xpass = xf[..., :rd], xf[..., rd:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
        rot = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rot, xpass), dim=-1).to(x.dtype)


def rotary_cos_sin(seqlen: int, rotary_dim: int, theta: float = 10000.0, scaling_type: str | None = None,
                   scaling_factor: float = 1.0, max_position_embeddings: int | None = None,
                   device=None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (seqlen, rotary_dim / 2) for InternLM2's RoPE.

    inv_freq_i = base^(-2i / d). ``linear`` scaling divides positions by the factor. ``dynamic`` (NTK) raises
    the base when seqlen exceeds max_position_embeddings:
    base = theta · (factor · seqlen / max_pos - (factor - 1)) ^ (d / (d - 2)).
    """
    base = theta
    if scaling_type == "dynamic" and max_position_embeddings is not None and seqlen > max_position_embeddings:
        base = theta * ((scaling_factor * seqlen / max_position_embeddings) - (scaling_factor - 1)) ** (
            rotary_dim / (rotary_dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float64) / rotary_dim))
    t = torch.arange(seqlen, device=device, dtype=torch.float64)
    if scaling_type == "linear":
        t = t / scaling_factor
    freqs = torch.outer(t, inv_freq)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def qkv_rotary(wqkv_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_kv_heads: int, head_dim: int,
               interleaved: bool = False, seqlen_offsets: int | torch.Tensor = 0,
               cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split InternLM2's packed wqkv output into q, k, v and rotate q and k (see ``apply_rotary_emb``).

    wqkv_out (B, S, F), or (total, F) with cu_seqlens, is viewed as (..., n_kv_heads, g + 2, head_dim): per KV
    group g query heads, then one key head, then one value head. Returns q (..., n_kv_heads · g, head_dim),
    k and v (..., n_kv_heads, head_dim), all contiguous.
    """
    lead = wqkv_out.shape[:-1]
    qkv = wqkv_out.reshape(*lead, n_kv_heads, -1, head_dim)              # (..., Hkv, g + 2, D)
    q = qkv[..., :-2, :].reshape(*lead, -1, head_dim)                    # (..., Hkv · g, D)
    k, v = qkv[..., -2, :], qkv[..., -1, :]                              # (..., Hkv, D)
    q = apply_rotary_emb(q, cos, sin, interleaved, seqlen_offsets, cu_seqlens)
    k = apply_rotary_emb(k, cos, sin, interleaved, seqlen_offsets, cu_seqlens)
    return q, k, v.contiguous()


# --------------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------------
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) in x's dtype: torch.nn.functional.linear."""
    return torch.nn.functional.linear(x, weight, bias)


# --------------------------------------------------------------------------------------------------
# Linear + cross-entropy
# --------------------------------------------------------------------------------------------------
def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  softcap: float = 0.0) -> torch.Tensor:
    """hidden @ weight.T (+ bias) in the compute dtype, softcapped (c · tanh(z / c)) when softcap > 0."""
    dt = _compute_dtype(hidden)
    z = hidden.to(dt) @ weight.to(dt).t()
    if bias is not None:
        z = z + bias.to(dt)
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    return z


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                         softcap: float = 0.0, class_weight: torch.Tensor | None = None,
                         token_scaling: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``target``; returns (loss, z_loss).

    hidden (N, H), weight (V, H), target (N,) int64: ``cross_entropy`` of the (softcapped) logits, computed in
    float32 (float64 for float64 inputs).
    """
    return cross_entropy(linear_logits(hidden, weight, bias), target, class_weight, ignore_index, reduction,
                         label_smoothing, lse_square_scale, softcap, token_scaling)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                  lse_square_scale: float = 0.0, softcap: float = 0.0,
                  token_scaling: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of logits (N, V) against target (N,) int64; returns (loss, z_loss), fp32 (fp64 for fp64).

    Logits z in float32, softcapped when softcap > 0: c · tanh(z / c). Per token, with lse = log Σ_v exp(z_v),
    class weights w (all 1 when ``class_weight`` is None) and W = Σ_v w_v:
      ce_t = (1 - ε) w_y (lse - z_y) + (ε / V) Σ_v w_v (lse - z_v),   z_loss_t = λ lse²,   loss_t = ce_t + z_loss_t
    with ε = label_smoothing and λ = lse_square_scale (z-loss, PaLM): torch's ``cross_entropy`` for λ = 0.
    ``token_scaling`` (Liger's ``use_token_scaling``) multiplies ce_t and z_loss_t by the token's predicted
    probability of its target, p_t = exp(z_y - lse), taken as a constant (no gradient flows through it).
    Tokens whose target is ``ignore_index`` contribute 0. reduction ``sum`` sums, ``none`` returns per-token
    values (N,), ``mean`` divides Σ ce_t by Σ_t w_{y_t} (the number of counted tokens without class weights, as
    torch's weighted cross_entropy) and Σ z_loss_t by the number of counted tokens (Liger's convention: the
    z-loss is not class-weighted); a denominator of 0 is taken as 1, so an all-ignored batch has loss 0.
    """
    dt = _compute_dtype(logits)
    z = logits.to(dt)
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    V = z.shape[-1]
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    w = torch.ones(V, dtype=dt, device=z.device) if class_weight is None else class_weight.to(dt)
    lse = torch.logsumexp(z, dim=-1)
    z_target = z.gather(-1, safe_target[:, None]).squeeze(-1)
    nll = lse - z_target
    smooth = (lse[:, None] - z).mul(w).sum(-1) / V
    ce = (1.0 - label_smoothing) * w[safe_target] * nll + label_smoothing * smooth
    z_loss = lse_square_scale * lse.pow(2)
    if token_scaling:
        p = torch.exp(z_target - lse).detach()
        ce, z_loss = ce * p, z_loss * p
    zero = torch.zeros_like(ce)
    ce, z_loss = torch.where(valid, ce, zero), torch.where(valid, z_loss, zero)
    if reduction == "none":
        return ce + z_loss, z_loss
    if reduction == "sum":
        return ce.sum() + z_loss.sum(), z_loss.sum()
    if reduction == "mean":
        weight_total = (w[safe_target] * valid).sum()
        weight_total = torch.where(weight_total > 0, weight_total, torch.ones_like(weight_total))
        count = valid.sum().clamp(min=1).to(dt)
        return ce.sum() / weight_total + z_loss.sum() / count, z_loss.sum() / count
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probability of ``targets`` and entropy under softmax(hidden @ weight.T / temperature).

    hidden (N, H), weight (V, H), targets (N,). With z = (W x_t) / T, lse = log Σ_v exp(z_v), p = exp(z - lse):
      logprob_t = z_target - lse,     entropy_t = lse - Σ_v p_v z_v
    both float32 (float64 for float64 inputs), 0 where the target is ``ignore_index``.
    """
    dt = _compute_dtype(hidden)
    z = (hidden.to(dt) @ weight.to(dt).t()) / temperature
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp = torch.log_softmax(z, dim=-1)
    token = logp.gather(-1, safe[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    zero = torch.zeros_like(token)
    return torch.where(valid, token, zero), torch.where(valid, entropy, zero)


def predicted_tokens(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Each token's argmax class (the first maximal one), -1 where the target is ``ignore_index``: (N,) int64."""
    return torch.where(target != ignore_index, logits.argmax(-1), torch.full_like(target, -1, dtype=torch.int64))


# --------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------
def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               maximize: bool = False, max_exp_avg_sq: torch.Tensor | None = None) -> None:
    """One AdamW step in place, exactly as ``torch.optim.AdamW`` (decoupled weight decay), ``step`` counted from 1:

      p ← p · (1 - lr · wd)
      m ← m + (1 - β1)(g - m);          v ← β2 v + (1 - β2) g²
      (AMSGrad: v̂ ← max(v̂, v), used in place of v below)
      p ← p - lr / (1 - β1^t) · m / (sqrt(v) / sqrt(1 - β2^t) + eps)
    """
    if maximize:
        grad = -grad
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    second = exp_avg_sq
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second = max_exp_avg_sq
    denom = (second.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def total_norm(tensors: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Norm of all tensors together, as ``torch.nn.utils.clip_grad_norm_`` computes it (float32 result)."""
    if not tensors:
        return torch.tensor(0.0)
    norms = torch.stack([torch.linalg.vector_norm(t.float(), norm_type) for t in tensors])
    return torch.linalg.vector_norm(norms, norm_type)


__all__ = [
    "attention_mask", "attention_one", "flash_attn_varlen", "rms_norm", "swiglu", "swiglu_packed",
    "rms_norm_low_precision", "rotary_positions", "apply_rotary_emb", "rotary_cos_sin", "qkv_rotary", "linear", "linear_cross_entropy", "adamw_step",
    "linear_logits", "cross_entropy", "predicted_tokens",
    "total_norm",
    "paged_positions", "flash_attn_with_kvcache", "flash_attn_varlen_paged", "linear_logprobs",
]
