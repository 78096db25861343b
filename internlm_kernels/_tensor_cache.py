"""One cache for results computed from tensors that many calls receive unchanged: the attention schedule built from
cu_seqlens (every layer, forward and backward), the value checks of a CPU cu_seqlens, the unpadding index lists the
transformers integration builds from a padding mask. An entry is reused only while every key tensor is the same live
object, unmodified since (same ``_version``); weak references keep no tensor alive.

Three cases never reuse an entry, so a cache can neither fail nor hand out a stale result:

* inference tensors (made under ``torch.inference_mode()``) have no version counter, so an in-place change could
  not be seen: the result is recomputed on every call, unless the cache was made with ``reuse_inference=True``
  (for key tensors their producer builds anew for each forward, which nothing modifies in place);
* CUDA graph capture: a result cached before the capture would be baked into the graph and replayed whatever the
  tensors hold at replay (``cu_seqlens.copy_(new)`` then leaves rows unwritten). Under capture the result is
  recomputed inside the captured work (``capturable=True``: torch ops on the device, replayed with the graph) or,
  for a computation that reads values on the host, refused with a RuntimeError; nothing made under capture is kept;
* torch.compile tracing: the computation is traced like any other code.
"""
from __future__ import annotations

import collections
import weakref
from typing import Callable, Sequence

import torch


def capturing(tensors: Sequence[torch.Tensor]) -> bool:
    """True while a CUDA graph is being captured on the current stream and some of ``tensors`` live on CUDA."""
    return any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing()


def _same_objects(refs: tuple[weakref.ref, ...], tensors: Sequence[torch.Tensor]) -> bool:
    """Whether each weak reference still points at the corresponding tensor (an id can be reused once freed)."""
    for ref, t in zip(refs, tensors):
        if ref() is not t:
            return False
    return True


class PerTensorCache:
    """Least-recently-used results keyed on (key tensors' identities and versions, ``key``)."""

    def __init__(self, what: str, *, capturable: bool, reuse_inference: bool = False, size: int = 32):
        self.what = what                        # named in the capture error
        self.capturable = capturable            # compute() only enqueues device work (no host reads)
        self.reuse_inference = reuse_inference  # inference tensors: reuse on identity alone
        self.size = size
        self._entries: collections.OrderedDict = collections.OrderedDict()

    def get(self, tensors: Sequence[torch.Tensor], key, compute: Callable):
        if torch.compiler.is_compiling():
            return compute()
        # One plain loop over the (one to three) key tensors into one flat key: this runs on every attention call
        # (forward and backward), where nested tuples, generator expressions and a helper call cost more than the
        # dictionary lookup itself.
        on_cuda = inference = False
        full_key = [key]
        for t in tensors:
            on_cuda = on_cuda or t.is_cuda
            if t.is_inference():   # no version counter to read
                inference = True
                full_key += (id(t), None)
            else:
                full_key += (id(t), t._version)
        if on_cuda and torch.cuda.is_current_stream_capturing():
            if not self.capturable:
                raise RuntimeError(
                    f"{self.what} reads tensor values on the host, which a CUDA graph cannot record; run this call "
                    "outside torch.cuda.graph capture")
            return compute()
        if inference and not self.reuse_inference:
            return compute()
        full_key = tuple(full_key)   # (key, id, version, id, version, ...); version None: inference
        hit = self._entries.get(full_key)
        if hit is not None and _same_objects(hit[0], tensors):
            self._entries.move_to_end(full_key)
            return hit[1]
        value = compute()
        self._entries[full_key] = (tuple(weakref.ref(t) for t in tensors), value)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)
