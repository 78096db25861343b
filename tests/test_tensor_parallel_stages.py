"""The alignment stages' pieces under tensor parallelism, on 2 real gloo ranks: the score model (its head
replicated on the gathered hidden states, the padding document of an odd token count never scored) gives one
process's values, scores and gradients; the SFT evaluation's gathered model generates one process's replies."""
from __future__ import annotations

import torch
from distributed_harness import MICRO, run_ranks

LENGTHS = (7, 12, 14)                    # 33 tokens: tp = 2 appends a padding document of one token
PROMPTS = [[5, 17, 33, 3], [60, 8], [9, 9, 41, 70, 12, 3]]


def _score_model():
    from models import InternLM2Config, InternLM2ForScore

    torch.manual_seed(0)
    return InternLM2ForScore(InternLM2Config(**MICRO))


def _lm():
    from models import InternLM2Config, InternLM2ForCausalLM

    torch.manual_seed(1)
    return InternLM2ForCausalLM(InternLM2Config(**MICRO))


def _batch():
    ids = torch.randint(0, MICRO["vocab_size"], (sum(LENGTHS),), generator=torch.Generator().manual_seed(2))
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return ids, cu


def _score_step(model):
    """(values, scores, {parameter: full gradient}) of a loss that weighs every score differently."""
    from torch.distributed.tensor import DTensor

    ids, cu = _batch()
    out = model(ids, cu, max_seqlen=max(LENGTHS))
    (out.scores * torch.tensor([1.0, -2.0, 3.0])).sum().backward()
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
             for n, p in model.named_parameters()}
    return out.values.detach(), out.scores.detach(), grads


def _on_tp_ranks(rank: int, world: int):
    from torch.distributed.device_mesh import init_device_mesh

    from models.tensor_parallel import parallelize_internlm2
    from train.parallel import plain_copy

    mesh = init_device_mesh("cpu", (world,))
    score = _score_step(parallelize_internlm2(_score_model(), mesh))
    lm = plain_copy(parallelize_internlm2(_lm(), mesh))
    return score, {k: v.clone() for k, v in lm.state_dict().items()}, lm.generate(PROMPTS, max_new_tokens=12)


def test_score_model_and_sft_generation_under_tensor_parallelism_equal_one_process():
    values, scores, grads = _score_step(_score_model())
    lm = _lm().eval()
    state, replies = lm.state_dict(), lm.generate(PROMPTS, max_new_tokens=12)
    assert all(len(r) == 12 for r in replies)           # no early stop: every step of the decode is compared
    for (got_values, got_scores, got_grads), got_state, got_replies in run_ranks(_on_tp_ranks, 2):
        assert got_values.shape == values.shape and got_scores.shape == scores.shape    # the padding: dropped
        torch.testing.assert_close(got_values, values, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_scores, scores, rtol=1e-5, atol=1e-6)
        assert set(got_grads) == set(grads)
        for name, g in grads.items():
            torch.testing.assert_close(got_grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
        assert set(got_state) == set(state) and all(torch.equal(got_state[k], v) for k, v in state.items())
        assert got_replies == replies
