"""The eager path of our custom ops, without torch.library's dispatch.

A call through ``torch.ops.internlm_kernels.*`` walks the dispatcher twice (autograd, then the backend), rebuilds the
argument list from the schema and wraps everything in a generated autograd.Function: tens of microseconds of Python
per call, more than a small kernel takes. For plain eager calls, ``call`` runs the op's own implementation directly:

* when a gradient is needed (grad mode on and some input requires grad), under a plain autograd.Function that calls
  the op's registered setup_context and backward, so both paths compute the same thing with the same code;
* otherwise (no_grad, inference_mode, inputs that require no grad: every backward launch, every inference call)
  the implementation alone, with no autograd node at all.

Anything the dispatcher must see still goes through it: torch.compile / export tracing, fake or meta tensors, tensor
subclasses (DTensor, functorch wrappers, live or dead; sparse tensors), functorch transforms (vmap, grad) and any
active dispatch mode.
"""
from __future__ import annotations

import torch

_Tensor = torch.Tensor   # a module global: ~0.2 µs less per call than the attribute lookup in the loop below
_PLAIN = (_Tensor, torch.nn.Parameter)
# ATen's "behaves like a tensor subclass" test, one C++ call: meta tensors, functorch wrappers (live or dead),
# tensors with a Python dispatch key (FakeTensor, DTensor, ...), sparse tensors.
_subclass_like = torch._C._dispatch_isTensorSubclassLike


def _dispatched(op, args):
    return getattr(getattr(torch.ops, op._namespace), op._name)(*args)   # as torch.ops.<namespace>.<name>


def _autograd_apply(op):
    """``apply`` of one autograd.Function per op, calling its implementation, setup_context and backward.

    It is the C++ ``apply`` of the Function's base class: ``torch.autograd.Function.apply`` only adds, in Python,
    argument binding for functions with a separate setup_context (ours has none), a functorch-transform branch and
    the unwrapping of dead functorch wrappers (``call`` sends both of those to the dispatcher instead); about 1 µs
    per call."""
    apply = getattr(op, "_ik_eager_apply", None)
    if apply is None:
        def forward(ctx, *args):
            output = op._init_fn(*args)
            op._setup_context_fn(ctx, args, output)
            return output

        def backward(ctx, *grads):
            return op._backward_fn(ctx, *grads)

        fn = type(f"{op._name.split('::')[-1]}_eager", (torch.autograd.Function,),
                  {"forward": staticmethod(forward), "backward": staticmethod(backward)})
        apply = op._ik_eager_apply = super(torch.autograd.Function, fn).apply
    return apply


def call(op, *args):
    """``op(*args)`` for a functional custom op (``torch.library.custom_op``) given all its arguments positionally."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or \
            torch._C._are_functorch_transforms_active():
        return _dispatched(op, args)
    for a in args:
        if isinstance(a, _Tensor) and (type(a) not in _PLAIN or _subclass_like(a)):
            return _dispatched(op, args)
    # torch.library's own autograd wrapper asks the same question with the same C++ helper.
    if op._backward_fn is not None and torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        return _autograd_apply(op)(*args)
    return op._init_fn(*args)
