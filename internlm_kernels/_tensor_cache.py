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
        if capturing(tensors):
            if not self.capturable:
                raise RuntimeError(
                    f"{self.what} reads tensor values on the host, which a CUDA graph cannot record; run this call "
                    "outside torch.cuda.graph capture")
            return compute()
        if any(t.is_inference() for t in tensors):
            if not self.reuse_inference:
                return compute()
            versions = None
        else:
            versions = tuple(t._version for t in tensors)
        full_key = (tuple(id(t) for t in tensors), versions, key)
        hit = self._entries.get(full_key)
        if hit is not None and all(ref() is t for ref, t in zip(hit[0], tensors)):
            self._entries.move_to_end(full_key)
            return hit[1]
        value = compute()
        self._entries[full_key] = (tuple(weakref.ref(t) for t in tensors), value)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)
