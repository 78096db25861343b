"""PPO's algorithmic core against direct plain-Python / plain-torch versions: GAE, reward shaping, the clipped
policy and value losses, whitening, the sampler/trainer mismatch metric."""
from __future__ import annotations

import math

import pytest
import torch

from train.rlhf.advantages import whiten
from train.rlhf.diagnostics import logprob_mismatch
from train.rlhf.losses import policy_loss, value_loss
from train.rlhf.rewards import checker_scores, kl_k1, last_valid_onehot, shape_rewards
from train.stages.ppo import gae


def ragged_mask(B, T, gen, holes=False):
    """Rows of random length (some empty, some full); with ``holes``, a few masked positions inside rows."""
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    lengths[0], lengths[-1] = T, 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    if holes:
        mask *= (torch.rand(B, T, generator=gen) > 0.2).float()
    return mask


def gae_loop(rewards, values, mask, gamma, lam):
    """The recursion written out per row over the valid positions, in Python floats."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t] > 0]
        next_v, next_a = 0.0, 0.0
        for t in reversed(idx):
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            a = delta + gamma * lam * next_a
            adv[b][t] = a
            next_v, next_a = float(values[b, t]), a
    adv = torch.tensor(adv, dtype=torch.float64)
    ret = torch.where(mask > 0, adv + values.double(), 0.0)
    return adv, ret


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.99), (0.97, 0.9), (1.0, 1.0), (0.5, 0.0)])
def test_gae_matches_loop(holes, gamma, lam):
    gen = torch.Generator().manual_seed(int(gamma * 100 + lam * 10 + holes))
    B, T = 7, 13
    mask = ragged_mask(B, T, gen, holes)
    rewards = torch.randn(B, T, generator=gen)
    values = torch.randn(B, T, generator=gen)
    # Garbage at masked positions must not leak into the result.
    rewards = torch.where(mask > 0, rewards, torch.full_like(rewards, 1e6))
    values = torch.where(mask > 0, values, torch.full_like(values, float("nan")))
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    want_adv, want_ret = gae_loop(rewards, values, mask, gamma, lam)
    assert adv.dtype == torch.float32 and adv.shape == (B, T)
    torch.testing.assert_close(adv.double(), want_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), want_ret, rtol=1e-5, atol=1e-5)
    assert not adv.isnan().any() and not ret.isnan().any()


def test_gae_defaults_are_internlm2s_and_bool_mask():
    gen = torch.Generator().manual_seed(3)
    mask = ragged_mask(4, 9, gen)
    r, v = torch.randn(4, 9, generator=gen), torch.randn(4, 9, generator=gen)
    adv, ret = gae(r, v, mask.bool())
    want_adv, want_ret = gae_loop(r, v, mask, 1.0, 0.99)
    torch.testing.assert_close(adv.double(), want_adv, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        adv2, _ = gae(r, v, mask)
    torch.testing.assert_close(adv2, adv)


def test_gae_compiles_fullgraph():
    gen = torch.Generator().manual_seed(5)
    mask = ragged_mask(3, 6, gen)
    r, v = torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    compiled = torch.compile(gae, fullgraph=True, backend="eager")
    got = compiled(r, v, mask)
    want = gae(r, v, mask)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_gae_bad_input():
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="values"):
        gae(r, torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="lam"):
        gae(r, r, torch.ones(2, 3), lam=1.5)
    with pytest.raises(ValueError, match="rewards"):
        gae(torch.zeros(3), torch.zeros(3), torch.ones(3))


def test_kl_and_reward_shaping_by_hand():
    # Two rows: lengths 3 and 2 (of T = 4), k1 per token = logp - ref.
    logp = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-0.1, -0.3, -7.0, -7.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -1.0], [-0.2, -0.1, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    scores = torch.tensor([2.0, -3.0])
    kl = kl_k1(logp, ref, mask)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [0.1, -0.2, 0.0, 0.0]]))
    rewards, kl2 = shape_rewards(scores, logp, ref, mask, kl_coef=0.1)
    want = torch.tensor([[-0.05, 0.1, 2.0, 0.0], [-0.01, 0.02 - 3.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, want)
    torch.testing.assert_close(kl2, kl)
    # Default coefficient is InternLM2's 0.01; the score sits at the last valid token even with a hole before it.
    holed = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]])
    rewards, _ = shape_rewards(scores, logp, ref, holed)
    torch.testing.assert_close(rewards, torch.tensor([[-0.005, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(last_valid_onehot(holed), torch.tensor([[0.0, 0, 1, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="kl_coef"):
        shape_rewards(scores, logp, ref, mask, kl_coef=-1.0)
    with pytest.raises(ValueError, match="scores"):
        shape_rewards(scores[:1], logp, ref, mask)


def test_checker_scores_by_hand():
    rm = torch.tensor([0.5, -1.0, 2.0, 0.25])
    correct = [True, False, None, False]
    torch.testing.assert_close(checker_scores(rm, correct, 1.5), torch.tensor([2.0, -2.5, 2.0, -1.25]))
    assert checker_scores(rm, correct, 0.0).tolist() == rm.tolist()    # weight 0: the reward model alone
    for bad in (-0.1, True, "1"):
        with pytest.raises(ValueError, match="checker_weight"):
            checker_scores(rm, correct, bad)
    with pytest.raises(ValueError, match="rm_scores"):
        checker_scores(rm, correct[:3], 1.0)


def plain_policy_loss(logp, old, adv, mask, eps):
    """Per valid token, written out in Python: -min(r A, clip(r) A), averaged."""
    total, n = 0.0, 0
    terms = []
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[b, t]:
                r = torch.exp(logp[b, t] - old[b, t])
                terms.append(-torch.minimum(r * adv[b, t], torch.clamp(r, 1 - eps, 1 + eps) * adv[b, t]))
                n += 1
    total = torch.stack(terms).sum()
    return total / n


@pytest.mark.parametrize("eps", [0.2, 0.05])
def test_policy_loss_and_gradient_vs_plain(eps):
    gen = torch.Generator().manual_seed(11)
    B, T = 5, 8
    mask = ragged_mask(B, T, gen, holes=True)
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    logp0 = old + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)   # many ratios outside the clip
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    logp = logp0.clone().requires_grad_(True)
    loss, stats = policy_loss(logp, old, adv, mask, clip_eps=eps)
    loss.backward()
    logp_ref = logp0.clone().requires_grad_(True)
    want = plain_policy_loss(logp_ref, old, adv, mask, eps)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logp.grad, logp_ref.grad, rtol=1e-5, atol=1e-7)
    assert (logp.grad[mask == 0] == 0).all()
    r = torch.exp(logp0 - old)
    clipped = ((r > 1 + eps) & (adv > 0)) | ((r < 1 - eps) & (adv < 0))
    assert 0 < float(stats["clip_fraction"]) < 1
    assert math.isclose(float(stats["clip_fraction"]), float(clipped[mask > 0].double().mean()), rel_tol=1e-6)
    # Clipped tokens get no gradient, unclipped ones get -A r / n.
    n = mask.sum()
    expect = torch.where(clipped, 0.0, -adv * r / n) * mask
    torch.testing.assert_close(logp.grad, expect, rtol=1e-5, atol=1e-9)


def test_policy_loss_num_tokens_splits_a_minibatch():
    gen = torch.Generator().manual_seed(2)
    mask = ragged_mask(6, 5, gen)
    old, adv = -torch.rand(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    logp = old + 0.1 * torch.randn(6, 5, generator=gen)
    whole, _ = policy_loss(logp, old, adv, mask)
    n = mask.sum()
    parts = sum(policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], num_tokens=n)[0]
                for i in range(0, 6, 2))
    torch.testing.assert_close(parts, whole)


def test_value_loss_unclipped_and_clipped_by_hand():
    v = torch.tensor([[1.0, 0.0, 3.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0]])
    ret = torch.tensor([[2.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss = value_loss(v, old, ret, mask)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (1.0 + 1.0) / 2))
    loss.backward()
    torch.testing.assert_close(v.grad, torch.tensor([[-0.5, -0.5, 0.0]]))
    # Clipped at 0.5 around old: token 0's value 1.0 -> 0.5, error (0.5 - 2)^2 = 2.25 > 1 wins.
    clipped = value_loss(v, old, ret, mask, clip_eps=0.5)
    torch.testing.assert_close(clipped, torch.tensor(0.5 * (2.25 + 1.0) / 2))
    with pytest.raises(ValueError, match="value_clip_eps"):
        value_loss(v, old, ret, mask, clip_eps=0.0)


def test_whiten_masked():
    gen = torch.Generator().manual_seed(4)
    mask = ragged_mask(5, 7, gen, holes=True)
    x = torch.randn(5, 7, generator=gen) * 3 + 2
    y = whiten(x, mask)
    vals = y[mask > 0]
    assert abs(float(vals.mean())) < 1e-5 and abs(float(vals.std(unbiased=False)) - 1) < 1e-4
    assert (y[mask == 0] == 0).all()


def test_logprob_mismatch_metric():
    s = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    t = torch.tensor([[-1.5, -2.0, -9.0], [-0.5, -1.5, -4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    m = logprob_mismatch(s, t, mask)
    torch.testing.assert_close(m["mean_abs"], torch.tensor((0.5 + 0 + 0 + 1.0) / 4))
    torch.testing.assert_close(m["mean"], torch.tensor((0.5 + 0 + 0 + 1.0) / 4))
    torch.testing.assert_close(m["max_abs"], torch.tensor(1.0))
    want = (math.exp(-0.5) + 1 + 1 + math.exp(-1.0)) / 4
    torch.testing.assert_close(m["ratio_mean"], torch.tensor(want))
