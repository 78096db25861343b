"""Issue 9 on a GPU (run by benchmarks/gpu_check.sh): inputs on a GPU that is not the current device (item 2), a
steady-state training step without a device→host sync (item 3), CUDA graph replay with new cu_seqlens contents
(item 4). Not run on CPU machines."""
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import internlm_kernels as ik

HQ, HKV, D = 4, 2, 64
HIDDEN = (HQ + 2 * HKV) * D // 2


def _cu(lengths, device):
    return F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32).to(device)


class _Block(torch.nn.Module):
    """One packed decoder layer made of the public ops: rms_norm → wqkv → qkv_rotary → varlen attention → wo →
    rms_norm → swiglu_packed → down, then fused linear cross-entropy."""

    def __init__(self, vocab=97):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.Parameter(torch.ones(HIDDEN)), torch.nn.Parameter(torch.ones(HIDDEN))
        self.wqkv = torch.nn.Linear(HIDDEN, (HQ + 2 * HKV) * D, bias=False)
        self.wo = torch.nn.Linear(HQ * D, HIDDEN, bias=False)
        self.up = torch.nn.Linear(HIDDEN, 4 * HIDDEN, bias=False)
        self.down = torch.nn.Linear(2 * HIDDEN, HIDDEN, bias=False)
        self.head = torch.nn.Parameter(torch.randn(vocab, HIDDEN) * 0.05)

    def forward(self, x, cu, max_seqlen, targets, cos, sin):
        h = ik.rms_norm(x, self.norm1, 1e-6)
        q, k, v = ik.qkv_rotary(self.wqkv(h), cos, sin, HKV, D, cu_seqlens=cu, max_seqlen=max_seqlen)
        a = ik.flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True)
        x = x + self.wo(a.reshape(x.shape[0], -1))
        x = x + self.down(ik.swiglu_packed(self.up(ik.rms_norm(x, self.norm2, 1e-6))))
        return ik.fused_linear_cross_entropy(x, self.head, targets)


def _inputs(lengths, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(lengths)
    x = torch.randn(total, HIDDEN, generator=g).to(device)
    targets = torch.randint(0, 97, (total,), generator=g).to(device)
    cos, sin = ik.rotary_cos_sin(max(lengths), D, device=device)
    return x, _cu(lengths, device), max(lengths), targets, cos, sin


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_ops_on_a_device_that_is_not_current():
    """Every op on cuda:1 while cuda:0 is current: same results as on cuda:0, and mixed devices are refused."""
    torch.manual_seed(0)
    results = []
    for device in ("cuda:0", "cuda:1"):
        torch.manual_seed(0)
        block = _Block().to(device)
        args = _inputs([5, 130, 64, 1], device)
        with torch.cuda.device(0):
            loss = block(*args)
            loss.backward()
            ik.clip_grad_norm_(block.parameters(), 1.0)
            ik.FusedAdamW(block.parameters(), lr=1e-3).step()
        torch.cuda.synchronize(device)
        results.append([loss.detach().cpu()] + [p.detach().cpu() for p in block.parameters()])
    for a, b in zip(*results):
        assert_close(a, b, 1e-5, 1e-5)
    x = torch.randn(9, 2, D, device="cuda:1")
    with pytest.raises(ValueError, match="^k "):
        ik.flash_attn_varlen_func(x, x.to("cuda:0"), x, _cu([9], "cuda:1"), _cu([9], "cuda:1"), 9, 9)


@pytest.mark.gpu
def test_gpu_steady_state_training_step_does_not_sync():
    """forward, backward, clip, FusedAdamW and zero_grad(set_to_none=True) for a few steps after a warm-up, with
    torch's sync debug mode raising on any device→host synchronization."""
    torch.manual_seed(0)
    block = _Block().cuda()
    opt = ik.FusedAdamW(block.parameters(), lr=1e-3)
    args = _inputs([5, 130, 64, 1], "cuda")

    def step():
        loss = block(*args)
        loss.backward()
        norm = ik.clip_grad_norm_(block.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), norm

    step()                                       # warm-up: kernel compilation, allocator growth, first work lists
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(loss) and torch.isfinite(norm) for loss, norm in losses)


@pytest.mark.gpu
def test_gpu_graph_replay_with_new_cu_seqlens_matches_eager():
    """Capture a packed training forward (loss and its backward), replay it after copying new cu_seqlens contents
    (same token count, other document boundaries): rows must follow the new boundaries, as in eager."""
    torch.manual_seed(0)
    block = _Block().cuda()
    x, cu, max_seqlen, targets, cos, sin = _inputs([5, 130, 64, 1], "cuda")
    static_cu = cu.clone()
    new_cu = _cu([100, 50, 40, 10], "cuda")

    def forward_backward():
        for p in block.parameters():
            p.grad = None
        loss = block(x, static_cu, 130, targets, cos, sin)
        loss.backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward_backward()                       # warm-up on a side stream, as torch.cuda.graphs recommends
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = forward_backward()
        static_grads = [p.grad for p in block.parameters()]
    static_cu.copy_(new_cu)
    graph.replay()
    torch.cuda.synchronize()

    for p in block.parameters():
        p.grad = None
    eager_loss = block(x, new_cu, 130, targets, cos, sin)
    eager_loss.backward()
    assert_close(static_loss, eager_loss, 1e-5, 1e-5)
    for got, p in zip(static_grads, block.parameters()):
        assert_close(got, p.grad, 1e-4, 1e-5)


@pytest.mark.gpu
def test_gpu_optimizer_step_refuses_capture():
    p = torch.nn.Parameter(torch.randn(8, device="cuda"))
    p.grad = torch.randn_like(p)
    opt = ik.FusedAdamW([p])
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured"):
        with torch.cuda.graph(graph):
            opt.step()
