"""Launching on the inputs' GPU: Triton launches on torch's current CUDA device and that device's current stream,
which need not be where the tensors are (a model split over two GPUs, ``device_map="auto"``)."""
from __future__ import annotations

import functools

import torch


def launches_on_input_device(launcher):
    """Run ``launcher`` (whose first argument is a tensor) with its tensor's CUDA device current, so its kernels go
    to that device and that device's current stream. The ops layer has already refused mixed-device inputs."""
    @functools.wraps(launcher)
    def on_input_device(first: torch.Tensor, *args, **kwargs):
        # Switch only when needed: entering torch.cuda.device costs a few µs of host time even when the device is
        # already current (the usual case, one GPU per process), and every launch passes here.
        if first.is_cuda and first.get_device() != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return launcher(first, *args, **kwargs)
        return launcher(first, *args, **kwargs)

    on_input_device.launches_on_input_device = True
    return on_input_device
