"""FusedAdamW and fused gradient-norm clipping: drop-in for torch.optim.AdamW and torch.nn.utils.clip_grad_norm_.

CPU tensors run the extension's OpenMP kernels, CUDA tensors its multi-tensor CUDA kernels (one launch for all
parameters of a group that share dtypes and step count); the ``reference`` backend runs the plain-torch
definitions of internlm_kernels/reference.py. docs/kernels/adamw.md describes the kernels.
"""
from __future__ import annotations

import functools
import math
from typing import Iterable

import torch

from . import _ext, reference
from .backend import choose, requested

LOW_PRECISION = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Elements per chunk of the multi-tensor work lists. CPU: one OpenMP work item, large enough to amortize
# scheduling. CUDA: one block of 512 threads, 16 vector iterations each; small enough that the last wave of
# blocks is a small fraction of a large launch.
CHUNK_SIZE = {"cpu": 1 << 16, "cuda": 1 << 15}

ADAMW_NUMEL_COLUMN = 6  # AdamWTensorRow: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, numel, unused
GRAD_NUMEL_COLUMN = 1   # GradTensorRow: data, numel, dtype, unused


@functools.cache
def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view of its storage); any other tensor itself."""
    dtensor = _dtensor_type()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def _like_param(grad: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A DTensor gradient laid out like its parameter (an embedding's gradient can come back replicated while
    its weight is sharded); a local slice unless the gradient is Partial."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(grad, dtensor) or grad.placements == p.placements:
        return grad
    return grad.redistribute(p.device_mesh, p.placements)


def _kernel_backend(op: str, device: torch.device, supported: bool, what: str) -> str:
    """choose(op, device), except that inputs the native kernels do not take run the reference under auto;
    a forced native backend raises NotImplementedError naming them."""
    name = choose(op, device)
    if name in ("cpu", "cuda") and not supported:
        if requested(op) != "auto":
            raise NotImplementedError(f"{op}: the {name} backend does not support {what}")
        return "reference"
    return name


def _as_float(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} as a Tensor must have exactly one element, got shape {tuple(value.shape)}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _check_hyperparameters(lr, betas, eps, weight_decay) -> None:
    if not 0.0 <= _as_float("lr", lr):
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= _as_float(f"betas[{i}]", beta) < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
    if not 0.0 <= _as_float("eps", eps):
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not 0.0 <= _as_float("weight_decay", weight_decay):
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


class FusedAdamW(torch.optim.Optimizer):
    """AdamW with torch.optim.AdamW's defaults, state layout (``step``, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``) and step semantics; state dicts load into either optimizer.

    ``lr`` may be a float or a one-element tensor (read once per step). ``master_weights=True`` keeps a
    float32 copy of each float16/bfloat16 parameter (state ``master_param``) and float32 moments; the step
    updates the master copy and writes it, rounded, into the parameter. Gradients may be float32, float16 or
    bfloat16 whatever the parameter dtype. All parameters must live on one device. float64 parameters run the
    reference implementation (the native kernels take the three dtypes above). DTensor parameters (FSDP2,
    tensor parallel) are updated shard by shard, with DTensor state of the same placements.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, master_weights=False):
        _check_hyperparameters(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        master_weights=master_weights)
        self._work_lists = _ext.WorkLists()
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        _check_hyperparameters(*(group.get(k, self.defaults[k]) for k in ("lr", "betas", "eps", "weight_decay")))
        devices = {p.device for g in self.param_groups for p in g["params"]}
        for p in group["params"]:
            if not isinstance(p, torch.Tensor):
                raise ValueError(f"params must be tensors, got {type(p).__name__}")
            if not p.is_floating_point():
                raise ValueError(f"params must be floating point, got a parameter of dtype {p.dtype}")
            devices.add(p.device)
        if len(devices) > 1:
            names = ", ".join(sorted(str(d) for d in devices))
            raise ValueError(f"params must all be on one device, got parameters on {names}")
        super().add_param_group(group)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # Groups loaded from a torch.optim.AdamW state dict lack our keys: take this optimizer's defaults.
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("master_weights", self.defaults.get("master_weights", False))
        if not hasattr(self, "_work_lists"):
            self._work_lists = _ext.WorkLists()

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every floating-point state tensor to its parameter's dtype, which would round the fp32
        # master copy and moments of a bfloat16 parameter; keep those in fp32.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_state = {i: dict(s) for i, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        for saved_id, (p, group) in zip(saved_ids, params):
            if not (group["master_weights"] and p.dtype in LOW_PRECISION) or saved_id not in saved_state:
                continue
            for key in ("master_param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                value = saved_state[saved_id].get(key)
                if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                    self.state[p][key] = value.to(p.device)

    def _prepared_state(self, p: torch.Tensor, group: dict, master: bool) -> dict:
        """The state of ``p`` with every tensor this step needs, in the dtype and device it needs.
        (Called for every parameter every step: the checks are the cheap ones.)"""
        state = self.state[p]
        step = state.get("step")
        if not (isinstance(step, torch.Tensor) and step.is_cpu and step.dtype == torch.float32):
            # New state, or one from a fused/capturable torch optimizer (step on the device): host it on the CPU.
            state["step"] = torch.tensor(float(step) if step is not None else 0.0, dtype=torch.float32)
        moment_dtype = torch.float32 if master else p.dtype
        if master:
            if "master_param" not in state:
                state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
        elif "master_param" in state:
            del state["master_param"]
        device_index = _local(p).get_device()
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq"):
            t = state.get(key)
            if t is None:
                state[key] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
            elif t.dtype != moment_dtype or _local(t).get_device() != device_index:
                state[key] = t.to(device=p.device, dtype=moment_dtype)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        if any(p.is_cuda for g in self.param_groups for p in g["params"]) and torch.cuda.is_current_stream_capturing():
            # The step count and the bias corrections are host numbers passed to the kernel by value: a replayed
            # graph would repeat the captured step's numbers forever.
            raise RuntimeError("FusedAdamW.step cannot be captured in a CUDA graph: its step count and bias "
                               "corrections are host scalars fixed at capture; run the optimizer step outside the graph")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        # Everything that can refuse runs before any state changes.
        device = params[0].device
        backends: dict[tuple[torch.dtype, torch.dtype], str] = {}
        for p in params:
            g = p.grad
            if g.is_sparse:
                raise ValueError("FusedAdamW does not support sparse gradients")
            if g.device != p.device:
                raise ValueError(f"a gradient is on {g.device} but its parameter is on {p.device}")
            if g.shape != p.shape:
                raise ValueError(f"a gradient has shape {tuple(g.shape)} but its parameter has {tuple(p.shape)}")
            if not g.is_floating_point():
                raise ValueError(f"gradients must be floating point, got {g.dtype}")
            dtypes = (p.dtype, g.dtype)
            if dtypes not in backends:
                supported = p.dtype in KERNEL_DTYPES and g.dtype in KERNEL_DTYPES
                backends[dtypes] = _kernel_backend("adamw", device, supported,
                                                   f"{p.dtype} parameters with {g.dtype} grads")
        hyper = dict(lr=_as_float("lr", group["lr"]), beta1=float(group["betas"][0]), beta2=float(group["betas"][1]),
                     eps=float(group["eps"]), weight_decay=float(group["weight_decay"]), maximize=group["maximize"])

        masters = [group["master_weights"] and p.dtype in LOW_PRECISION for p in params]
        states = [self._prepared_state(p, group, m) for p, m in zip(params, masters)]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)

        # Parameters that share a kernel launch: same backend, dtypes, master weights and step count.
        # DTensor parameters (FSDP2, tensor parallel) update their local shards: AdamW is elementwise.
        buckets: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, dict]]] = {}
        for p, state, master, step in zip(params, states, masters, steps):
            key = (backends[(p.dtype, p.grad.dtype)], master, p.dtype, p.grad.dtype, float(step))
            local_state = {k: _local(v) for k, v in state.items()}
            buckets.setdefault(key, []).append((_local(p), _local(_like_param(p.grad, p)), local_state))
        for (backend, master, _, _, step), items in buckets.items():
            if backend == "reference":
                _adamw_reference(items, master, step, **hyper)
            else:
                _adamw_native(self._work_lists, items, master, group["amsgrad"], step, **hyper)


def _adamw_reference(items, master: bool, step: float, *, lr, beta1, beta2, eps, weight_decay, maximize) -> None:
    for p, grad, state in items:
        target = state["master_param"] if master else p
        reference.adamw_step(target, grad.to(target.dtype), state["exp_avg"], state["exp_avg_sq"], int(step), lr,
                             beta1, beta2, eps, weight_decay, maximize, state.get("max_exp_avg_sq"))
        if master:
            p.copy_(target)


def _adamw_scalars(step: float, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                   maximize: bool) -> tuple[float, ...]:
    """The AdamWScalars of csrc/adamw.h, computed in double as torch's single-tensor AdamW computes them."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    return (1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, bias_correction2 ** 0.5, -(lr / bias_correction1),
            eps, -1.0 if maximize else 1.0)


def _contiguous_for_kernel(t: torch.Tensor, writebacks: list) -> torch.Tensor:
    """``t`` itself when contiguous, else a contiguous copy that is written back after the kernel."""
    if t.is_contiguous():
        return t
    tmp = t.contiguous()
    writebacks.append((t, tmp))
    return tmp


def _adamw_native(work_lists: _ext.WorkLists, items, master: bool, amsgrad: bool, step: float, *, lr, beta1,
                  beta2, eps, weight_decay, maximize) -> None:
    C = _ext.load()
    codes = _ext.dtype_codes()
    device = items[0][0].device
    rows, writebacks, grads = [], [], []
    for p, grad, state in items:
        grads.append(grad.contiguous())  # read only: a copy, if one is needed, must outlive the launch
        rows.append((
            _contiguous_for_kernel(p, writebacks).data_ptr(),
            grads[-1].data_ptr(),
            _contiguous_for_kernel(state["exp_avg"], writebacks).data_ptr(),
            _contiguous_for_kernel(state["exp_avg_sq"], writebacks).data_ptr(),
            _contiguous_for_kernel(state["max_exp_avg_sq"], writebacks).data_ptr() if amsgrad else 0,
            _contiguous_for_kernel(state["master_param"], writebacks).data_ptr() if master else 0,
            p.numel(),
            0,
        ))
    work = work_lists.get(rows, ADAMW_NUMEL_COLUMN, CHUNK_SIZE[device.type], device)
    scalars = _adamw_scalars(step, lr, beta1, beta2, eps, weight_decay, maximize)
    param_dtype, grad_dtype = codes[items[0][0].dtype], codes[items[0][1].dtype]
    args = (work.table.data_ptr(), work.chunks.data_ptr(), work.n_chunks, work.chunk_size, param_dtype, grad_dtype,
            master, amsgrad, scalars)
    if device.type == "cuda":
        C.adamw_cuda(*args, device.index, _ext.cuda_stream(device))
    else:
        C.adamw_cpu(*args, _ext.cpu_threads(work))
    for original, tmp in writebacks:
        original.copy_(tmp)


def _grads_of(parameters) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = []
    for p in parameters:
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"parameters must be tensors, got {type(p).__name__}")
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise ValueError("gradient clipping does not support sparse gradients")
        if not p.grad.is_floating_point():
            raise ValueError(f"gradients must be floating point, got {p.grad.dtype}")
        grads.append(p.grad)
    return grads


def _norm_kind(norm_type: float) -> int | None:
    """The kernels' code for an L_p norm, or None for orders they do not take (0, negative, -inf, NaN)."""
    kinds = _ext.norm_kinds()
    if norm_type == math.inf:
        return kinds["inf"]
    if norm_type == 2.0:
        return kinds["l2"]
    if norm_type == 1.0:
        return kinds["l1"]
    if 0.0 < norm_type < math.inf:
        return kinds["p"]
    return None


_grad_work_lists = _ext.WorkLists()


def _grad_rows(grads: list[torch.Tensor]) -> list[tuple[int, int, int, int]]:
    codes = _ext.dtype_codes()
    return [(g.data_ptr(), g.numel(), codes[g.dtype], 0) for g in grads]


def _device_norm(grads: list[torch.Tensor], norm_type: float, backend: str) -> torch.Tensor:
    """Norm (float32 scalar on the grads' device) of same-device gradients."""
    if backend == "reference":
        return reference.total_norm(grads, norm_type)
    C = _ext.load()
    device = grads[0].device
    grads = [g.contiguous() for g in grads]  # read only; copies (rare) live until the launch is queued
    work = _grad_work_lists.get(_grad_rows(grads), GRAD_NUMEL_COLUMN, CHUNK_SIZE[device.type], device)
    out = torch.empty((), dtype=torch.float32, device=device)
    if device.type == "cuda":
        partials = torch.empty(work.n_chunks, dtype=torch.float32, device=device)
        C.grad_norm_cuda(work.table.data_ptr(), work.chunks.data_ptr(), work.n_chunks, work.chunk_size,
                         _norm_kind(norm_type), norm_type, partials.data_ptr(), out.data_ptr(), device.index,
                         _ext.cuda_stream(device))
    else:
        partials = torch.empty(work.n_chunks, dtype=torch.float64)
        C.grad_norm_cpu(work.table.data_ptr(), work.chunks.data_ptr(), work.n_chunks, work.chunk_size,
                        _norm_kind(norm_type), norm_type, partials.data_ptr(), out.data_ptr(), _ext.cpu_threads(work))
    return out


def _device_scale(grads: list[torch.Tensor], total_norm: torch.Tensor, max_norm: float, backend: str) -> None:
    """Multiply same-device gradients by min(max_norm / (total_norm + 1e-6), 1), as torch does."""
    if backend == "reference":
        coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return
    C = _ext.load()
    device = grads[0].device
    writebacks = []
    grads = [_contiguous_for_kernel(g, writebacks) for g in grads]
    work = _grad_work_lists.get(_grad_rows(grads), GRAD_NUMEL_COLUMN, CHUNK_SIZE[device.type], device)
    args = (work.table.data_ptr(), work.chunks.data_ptr(), work.n_chunks, work.chunk_size, total_norm.data_ptr(),
            max_norm)
    if device.type == "cuda":
        C.grad_scale_cuda(*args, device.index, _ext.cuda_stream(device))
    else:
        C.grad_scale_cpu(*args, _ext.cpu_threads(work))
    for original, tmp in writebacks:
        original.copy_(tmp)


def _grads_by_device(grads: list[torch.Tensor], norm_type: float) -> dict[torch.device, tuple[str, list]]:
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    out = {}
    for device, gs in by_device.items():
        supported = _norm_kind(norm_type) is not None and all(g.dtype in KERNEL_DTYPES for g in gs)
        backend = _kernel_backend("grad_norm", device, supported,
                                  f"norm_type={norm_type} with grads of dtypes {sorted({str(g.dtype) for g in gs})}")
        out[device] = (backend, gs)
    return out


def _total_norm(groups: dict, norm_type: float) -> torch.Tensor:
    norms = [_device_norm(gs, norm_type, backend) for backend, gs in groups.values()]
    return _combine_norms(norms, norm_type)


def _combine_norms(norms: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    if len(norms) == 1:
        return norms[0]
    first = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), norm_type)


def _norm_over_mesh(local_norm: torch.Tensor, mesh, placements, norm_type: float) -> torch.Tensor:
    """The norm of a DTensor family from the norm of this rank's local shards: p-th powers summed (max for
    inf) over the mesh dimensions the tensors are sharded on; replicated dimensions hold the same values."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    if any(p.is_partial() for p in placements):
        raise NotImplementedError("gradients with a Partial placement (reduce them first)")
    op = "max" if norm_type == math.inf else "sum"
    value = local_norm if op == "max" else local_norm.pow(norm_type)
    # Every placement but Replicate splits the tensor (Shard, and FSDP2 + TP's _StridedShard, whose is_shard()
    # is False).
    reduced = [Replicate() if p.is_replicate() else Partial(op) for p in placements]
    full = DTensor.from_local(value, mesh, reduced, run_check=False).full_tensor()
    return full if op == "max" else full.pow(1.0 / norm_type)


def _norm_and_groups(grads: list[torch.Tensor], norm_type: float) -> tuple[torch.Tensor, list[dict]]:
    """The global norm of ``grads`` and the per-device groups of (local) tensors to scale. DTensor gradients
    are grouped by (mesh, placements) and their local norms reduced over the mesh."""
    dtensor = _dtensor_type()
    plain, sharded = [], {}
    for g in grads:
        if dtensor is not None and isinstance(g, dtensor):
            sharded.setdefault((g.device_mesh, tuple(g.placements)), []).append(g.to_local())
        else:
            plain.append(g)
    norms, groups = [], []
    if plain:
        groups.append(_grads_by_device(plain, norm_type))
        norms.append(_total_norm(groups[-1], norm_type))
    for (mesh, placements), local in sharded.items():
        groups.append(_grads_by_device(local, norm_type))
        norms.append(_norm_over_mesh(_total_norm(groups[-1], norm_type), mesh, placements, norm_type))
    return _combine_norms(norms, norm_type), groups


def _check_foreach(foreach) -> None:
    if foreach not in (None, True, False):
        raise ValueError(f"foreach must be None, True or False, got {foreach!r}")


@torch.no_grad()
def total_grad_norm(parameters: torch.Tensor | Iterable[torch.Tensor], norm_type: float = 2.0,
                    foreach: bool | None = None) -> torch.Tensor:
    """The norm of all gradients together (float32 scalar on the first gradient's device), as
    clip_grad_norm_ computes it, without clipping. 0 when no parameter has a gradient."""
    _check_foreach(foreach)
    grads = _grads_of(parameters)
    if not grads:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    return _norm_and_groups(grads, norm_type)[0]


@torch.no_grad()
def clip_grad_norm_(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """Scale gradients in place so their total norm is at most ``max_norm``; returns the total norm.

    Same contract as torch.nn.utils.clip_grad_norm_: coefficient min(max_norm / (norm + 1e-6), 1) applied to
    every gradient, a non-finite norm raises RuntimeError with ``error_if_nonfinite`` (else the gradients are
    scaled by it, as torch does), the returned norm has the gradients' (promoted) dtype. The norm is
    accumulated in float32 or wider whatever the gradient dtype, and the coefficient is read on the device
    (no host synchronization unless ``error_if_nonfinite``). ``foreach`` only selects an implementation in
    torch; here every path is multi-tensor, so it is accepted for compatibility and changes nothing.
    Norm orders the kernels do not take (0, negative, -inf) run the reference implementation.
    DTensor gradients (FSDP2, tensor parallel): the kernels run on the local shards and the norm is reduced over
    each mesh (every rank of the mesh must call); the returned norm is a plain tensor.
    """
    _check_foreach(foreach)
    grads = _grads_of(parameters)
    if not grads:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    max_norm = _as_float("max_norm", max_norm)
    total, groups = _norm_and_groups(grads, norm_type)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`")
    for by_device in groups:
        for device, (backend, gs) in by_device.items():
            _device_scale(gs, total.to(device), max_norm, backend)
    return total.to(functools.reduce(torch.promote_types, [g.dtype for g in grads]))

