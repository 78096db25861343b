"""The eager path of our custom ops, without torch.library's dispatch.

A call through ``torch.ops.internlm_kernels.*`` walks the dispatcher twice (autograd, then the backend), rebuilds the
argument list from the schema and wraps everything in a generated autograd.Function: tens of microseconds of Python
per call, more than a small kernel takes. For plain eager calls, ``call`` runs the op's own implementation directly,
under a plain autograd.Function that calls the op's registered setup_context and backward (so both paths compute the
same thing with the same code). Anything the dispatcher must see still goes through it: torch.compile / export
tracing, fake or meta tensors, tensor subclasses (DTensor, functorch wrappers), functorch transforms (vmap, grad) and
any active dispatch mode.
"""
from __future__ import annotations

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_DEVICES = ("cpu", "cuda")


def _eager_ok(args) -> bool:
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or \
            torch._C._are_functorch_transforms_active():
        return False
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN or a.device.type not in _DEVICES):
            return False
    return True


def _autograd_function(op) -> type[torch.autograd.Function]:
    """One autograd.Function per op, calling its implementation, setup_context and backward."""
    fn = getattr(op, "_ik_eager_autograd", None)
    if fn is None:
        def forward(ctx, *args):
            output = op._init_fn(*args)
            op._setup_context_fn(ctx=ctx, inputs=args, output=output)
            return output

        def backward(ctx, *grads):
            return op._backward_fn(ctx, *grads)

        fn = type(f"{op._name.split('::')[-1]}_eager", (torch.autograd.Function,),
                  {"forward": staticmethod(forward), "backward": staticmethod(backward)})
        op._ik_eager_autograd = fn
    return fn


def call(op, *args):
    """``op(*args)`` for a functional custom op (``torch.library.custom_op``) given all its arguments positionally."""
    if not _eager_ok(args):
        return getattr(getattr(torch.ops, op._namespace), op._name)(*args)   # as torch.ops.<namespace>.<name>
    if op._backward_fn is not None and torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return _autograd_function(op).apply(*args)
    return op._init_fn(*args)
