"""The packed training forward under torch.compile(fullgraph=True): no graph break, so no device-to-host sync
(a ``.item()``, ``int(t)`` or ``bool(t)`` on a tensor breaks the graph), and the same loss and gradients as eager.
With the Triton kernels (under the interpreter on CPU), and with the cpu backends that ``make demo`` trains on
(attention as one opaque op, the other ops traced as ATen calls)."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import internlm_kernels as ik
from models import InternLM2Config, InternLM2ForCausalLM


# auto on CPU tensors: every op's cpu backend (what `make demo` trains on).
@pytest.mark.parametrize("backend", ["triton", pytest.param("auto", id="cpu")])
def test_packed_training_forward_compiles_fullgraph_and_matches_eager(backend):
    torch.manual_seed(0)
    model = InternLM2ForCausalLM(InternLM2Config(vocab_size=300, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(0, 300, (45,))
    cu = torch.tensor([0, 13, 14, 45], dtype=torch.int32)     # unequal documents, one of a single token
    torch._dynamo.reset()
    with ik.use_backend(backend):
        eager = model(ids, cu_seqlens=cu, max_seqlen=31, labels=ids)
        eager.loss.backward()
        want = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        compiled = torch.compile(model, fullgraph=True)(ids, cu_seqlens=cu, max_seqlen=31, labels=ids)
        compiled.loss.backward()
    assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-6)
    for p, g in zip(model.parameters(), want):
        assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
