"""The ops: input checks, backend choice, torch.library custom ops with fake kernels and autograd."""
