"""The cpu backend of varlen attention: the extension's blocked kernels (cpu/attention.py) or ATen's CPU flash
kernel (torch SDPA per document), chosen by measurement (cpu/attention_choice.py).

Which one runs depends on cu_seqlens' values: causal documents with more queries than keys (rows that see no key)
go to the reference, the per-document split reads the lengths, and the measured choice is keyed by them. Reading
values is free in eager (CPU tensors: no device sync) but breaks a torch.compile graph, so:

* eager (``attention``): the check, the choice, and the chosen implementation's own autograd, as ever;
* traced (``attention_traced``): one opaque custom op whose implementation does the same work on the real tensors
  at run time, so Dynamo sees one call and no graph break.

Custom ops (torch.ops.internlm_kernels.*), float32 and any other floating dtype:
  cpu_attention_fwd(q, k, v, cu_q, cu_k, scale, causal, grad, forced) -> (out, lse, path)
  cpu_attention_bwd(dout, q, k, v, out, lse, path, cu_q, cu_k, scale, causal) -> (dq, dk, dv)
``path`` (0-d int64) says what the forward ran: the kernels (their backward reads the saved out and lse), SDPA or the
reference (the backward runs that forward again under autograd, bitwise the same, and differentiates it: the
implementation's own backward, at the cost of one more forward; lse is then the reference's, or zeros for SDPA,
which returns none). ``grad`` is whether the traced call records gradients (inside the compiled graph the op runs with
autograd off, so it cannot ask), which the measured choice is keyed by; ``forced``: the user forced the cpu backend,
so rows without keys raise instead of taking the reference.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .. import reference
from ..checks import records_grad
from ..cpu import attention as cpu_attention
from ..cpu import attention_choice

NO_KEY = "causal with more queries than keys (rows that see no key)"
KERNELS, SDPA, REFERENCE = 0, 1, 2


def unsupported(dropout_p, window_left, window_right, softcap, alibi_slopes, return_attn_probs) -> str | None:
    """None when the cpu backend covers these arguments (before the rows-without-keys check on the values), else the
    argument it lacks."""
    if dropout_p > 0.0:
        return "dropout_p"
    if softcap > 0.0:
        return "softcap"
    if alibi_slopes is not None:
        return "alibi_slopes"
    if return_attn_probs:
        return "return_attn_probs (SDPA does not return the softmax lse)"
    if window_left != -1 or window_right not in (-1, 0):
        return "window_size"
    return None


def unsupported_error(lacking: str) -> NotImplementedError:
    return NotImplementedError(f"the cpu attention backend (torch SDPA per document) does not support {lacking}; "
                               "use the reference or triton backend")


def rows_without_keys(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> bool:
    """Whether a document has more queries than keys (then, causal, its first rows see no key). Reads the values:
    CPU tensors, no device sync."""
    return bool(((cu_seqlens_q[1:] - cu_seqlens_q[:-1]) > (cu_seqlens_k[1:] - cu_seqlens_k[:-1])).any())


def sdpa_per_document(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal):
    """The cpu backend where the extension's kernels (cpu/attention.py) do not run (other dtypes and head dims, no
    extension, or measured slower): ATen's fused CPU flash attention (torch SDPA) per document, GQA without
    repeating K/V.

    SDPA takes ATen's flash kernel (``_scaled_dot_product_flash_attention_for_cpu``, forward and backward) only for
    4-D (batch, heads, L, D) input; 3-D input falls back to the math path, which materializes the scores. A batch of
    equal-length documents is one call over views of q, k, v; otherwise each document is its own batch of one.
    Causal documents with fewer queries than keys get the bottom-right aligned mask explicitly. Outputs are
    concatenated (no zero-filled buffer written by slices, whose backward would be a chain of copies)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()               # CPU tensors: no device sync
    gqa = q.shape[1] != k.shape[1]
    lens_q = [b - a for a, b in zip(cq[:-1], cq[1:])]
    lens_k = [b - a for a, b in zip(ck[:-1], ck[1:])]
    if lens_q[0] > 0 and all(n == lens_q[0] for n in lens_q) and lens_k == lens_q:
        L, B = lens_q[0], len(lens_q)

        def heads(t):                                                     # (B·L, H, D) -> (B, H, L, D) view
            return t.view(B, L, t.shape[1], t.shape[2]).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=causal, scale=softmax_scale,
                                             enable_gqa=gqa)
        return out.transpose(1, 2).reshape(q.shape)
    # One split per tensor: its backward is one concatenation, where per-document slices would each zero-fill and
    # accumulate a full-size gradient.
    qs, ks, vs = q.split(lens_q), k.split(lens_k), v.split(lens_k)
    pieces = []
    for b in range(len(lens_q)):
        Lq, Lk = lens_q[b], lens_k[b]
        if Lq == 0:
            continue
        if Lk == 0:
            pieces.append(q.new_zeros(Lq, *q.shape[1:]))                   # no key: out 0, as flash-attn
            continue
        qd = qs[b].transpose(0, 1).unsqueeze(0)                           # (1, Hq, Lq, D)
        kd = ks[b].transpose(0, 1).unsqueeze(0)                           # (1, Hkv, Lk, D)
        vd = vs[b].transpose(0, 1).unsqueeze(0)
        mask = None
        if causal and Lq != Lk:
            mask = reference.attention_mask(Lq, Lk, True, (-1, 0), device=q.device)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, is_causal=causal and mask is None,
                                            scale=softmax_scale, enable_gqa=gqa)
        pieces.append(od[0].transpose(0, 1))                              # (Lq, Hq, D)
    return torch.cat(pieces) if pieces else torch.zeros_like(q)


def _reference(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale):
    """What the auto backend runs for causal rows without keys (out, lse): the reference, causal as window (-1, 0)."""
    return reference.flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, False, (-1, 0))


def _runs_kernels(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, grad: bool) -> bool:
    """Whether the kernels (rather than SDPA per document) compute this call: they cover it and were measured faster
    for its shape class (timed with gradients when ``grad``)."""
    def kernels(q, k, v):
        return cpu_attention.attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)

    def sdpa(q, k, v):
        return sdpa_per_document(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)

    return cpu_attention.runs(q, k, v) and attention_choice.use_kernels(q, k, v, cu_seqlens_q.numel() - 1, causal,
                                                                        grad, kernels, sdpa)


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal):
    """Eager: out of the kernels' autograd Function or of SDPA per document (torch autograd), whichever was measured
    faster. The caller has routed causal rows without keys elsewhere."""
    grad = records_grad(q, k, v)
    if _runs_kernels(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, grad):
        return cpu_attention.attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    return sdpa_per_document(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)


@contextlib.contextmanager
def _autograd_inside_op():
    """torch autograd inside a custom op's implementation, for the measured choice (it times forward+backward) and
    the backward's recompute: the dispatcher runs an implementation below autograd (autograd's dispatch keys
    excluded) and a compiled graph runs it with grad mode off; both come back on here (the guard is the one
    torch.utils.checkpoint uses to lift a key's exclusion)."""
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality, False), \
            torch.enable_grad():
        yield


def _kernels_chosen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, grad: bool) -> bool:
    """``_runs_kernels`` inside the op, where measuring with gradients needs autograd back on."""
    with _autograd_inside_op():
        return _runs_kernels(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, grad)


@torch.library.custom_op("internlm_kernels::cpu_attention_fwd", mutates_args=())
def cpu_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, softmax_scale: float, causal: bool, grad: bool,
                      forced: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if causal and rows_without_keys(cu_seqlens_q, cu_seqlens_k):
        if forced:
            raise unsupported_error(NO_KEY)
        out, lse = _reference(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale)
        path = REFERENCE
    elif _kernels_chosen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, grad):
        out, lse = cpu_attention.forward(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q.contiguous(),
                                         cu_seqlens_k.contiguous(), softmax_scale, causal)
        path = KERNELS
    else:
        out = sdpa_per_document(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal).contiguous()
        lse = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32)   # SDPA returns none; nothing reads it
        path = SDPA
    return out, lse, torch.tensor(path)


@cpu_attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, grad, forced):
    return (q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32),
            q.new_empty((), dtype=torch.int64))


@torch.library.custom_op("internlm_kernels::cpu_attention_bwd", mutates_args=())
def cpu_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, path: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                      softmax_scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    path = int(path)                                                      # a CPU tensor: no device sync
    if path == KERNELS:
        return cpu_attention.backward(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out, lse,
                                      cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), softmax_scale, causal)
    with _autograd_inside_op():
        leaves = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
        if path == SDPA:
            again = sdpa_per_document(*leaves, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
        else:
            again = _reference(*leaves, cu_seqlens_q, cu_seqlens_k, softmax_scale)[0]
    if not again.requires_grad:           # no query saw a key: out is zeros that depend on nothing
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return torch.autograd.grad(again, leaves, dout, materialize_grads=True)


@cpu_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, path, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, _, _ = inputs
    out, lse, path = output
    ctx.save_for_backward(q, k, v, out, lse, path, cu_seqlens_q, cu_seqlens_k)
    ctx.params = (softmax_scale, causal)
    ctx.set_materialize_grads(False)      # lse and path get no gradient: None, not tensors of zeros


def _backward(ctx, dout, dlse, dpath):
    q, k, v, out, lse, path, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None, None, None, None, None
    dq, dk, dv = cpu_attention_bwd(dout, q, k, v, out, lse, path, cu_seqlens_q, cu_seqlens_k, *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None


cpu_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention_traced(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, forced: bool):
    """Under torch.compile: out of one ``cpu_attention_fwd`` node (the check, the choice and the implementation run
    inside it, on the real tensors)."""
    grad = records_grad(q, k, v)
    return cpu_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, grad, forced)[0]
