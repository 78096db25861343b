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


ROWS = torch.tensor([[5, 17, 33, 3, 0, 0, 0], [60, 8, 1, 2, 7, 44, 9], [9, 9, 41, 0, 0, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1] * 7, [1, 1, 1, 0, 0, 0, 0]])      # 14 tokens; then 13 (row 2 cut)


def _ppo_forwards(lm, critic, rows: int):
    """PPO's per-action log-probs and values of a right-padded batch (train.rlhf.iteration), and the gradients of a
    loss that weighs every action differently."""
    from torch.distributed.tensor import DTensor

    from train.rlhf.iteration import action_logprobs, action_values

    ids, mask = ROWS[:rows], MASK[:rows].clone()
    if rows == 3:
        mask[2, 2] = 0                                    # 13 valid tokens: tp = 2 appends a padding row
    weights = torch.linspace(-1.0, 2.0, ids.shape[0] * (ids.shape[1] - 1)).reshape(ids.shape[0], -1)
    logp = action_logprobs(lm, ids, mask, temperature=0.7)
    values = action_values(critic, ids, mask)
    ((logp * weights).sum() + (values * weights).sum()).backward()
    grads = {f"{tag}.{n}": (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
             for tag, m in (("lm", lm), ("critic", critic)) for n, p in m.named_parameters()}
    return logp.detach(), values.detach(), grads


def _ppo_on_tp_ranks(rank: int, world: int):
    from torch.distributed.device_mesh import init_device_mesh

    from models.tensor_parallel import parallelize_internlm2

    mesh = init_device_mesh("cpu", (world,))
    return [_ppo_forwards(parallelize_internlm2(_lm(), mesh), parallelize_internlm2(_score_model(), mesh), rows)
            for rows in (3, 2)]


def test_ppo_logprobs_and_values_of_padded_rows_under_tensor_parallelism_equal_one_process():
    """A right-padded (B, S) batch (PPO's rollouts) on tensor-parallel models: an odd token count gets a padding
    row, dropped from the outputs; the log-probs run vocabulary-parallel. Values and gradients equal one process's
    (fp32; the ranks reorder sums over half the features and half the vocabulary: 1e-5 relative)."""
    want = [_ppo_forwards(_lm(), _score_model(), rows) for rows in (3, 2)]
    for got_rank in run_ranks(_ppo_on_tp_ranks, 2):
        for (logp, values, grads), (want_logp, want_values, want_grads) in zip(got_rank, want):
            assert logp.shape == want_logp.shape and values.shape == want_values.shape
            assert bool((want_logp[:2, :2] < 0).all()) and bool((want_logp[0, 3:] == 0).all())   # reached; padding 0
            torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(values, want_values, rtol=1e-5, atol=1e-6)
            assert set(grads) == set(want_grads)
            for name, g in want_grads.items():
                torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5 * float(g.abs().max()), msg=name)
