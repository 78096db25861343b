"""One PPO iteration of train.rlhf.iteration equals a plain-torch implementation of the same iteration (same
models, same rollouts, same mini-batch order), and the critic warmup leaves the actor untouched.

The plain version below shares nothing with the production path but the model classes: log-probs from full logits
of the padded forward, rewards / GAE / losses written out per row, torch.optim.AdamW and torch's grad clipping."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import internlm_kernels as ik
from models import InternLM2Config
from models.internlm2 import InternLM2ForCausalLM, InternLM2ForScore
from train.data.packing import Batch
from train.parallel import Runtime
from train.rlhf.iteration import PPOConfig, Rollout, action_logprobs, make_experience, ppo_iteration, ppo_learner

CFG = InternLM2Config.preset("micro")


def micro_models(seed=0):
    torch.manual_seed(seed)
    actor = InternLM2ForCausalLM(CFG)
    critic = InternLM2ForScore(CFG)
    critic.score_head.weight.data.normal_(0, 0.5)      # a non-trivial initial value function
    return actor, copy.deepcopy(actor).eval(), critic


def random_rollout(B=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(2, 6, (B,), generator=gen)
    response = torch.randint(1, 7, (B,), generator=gen)
    response[0] = 0 if B > 2 else response[0]          # a response that ended at once (no action at all)
    S = int((prompt + response).max())
    ids = torch.randint(3, CFG.vocab_size, (B, S), generator=gen)
    pos = torch.arange(S)[None, :]
    attn = (pos < (prompt + response)[:, None]).long()
    ids = ids * attn + 2 * (1 - attn)                  # pad with eos
    # action t is token t+1: a response token when prompt <= t+1 < prompt + response
    action = ((pos[:, :-1] + 1 >= prompt[:, None]) & (pos[:, :-1] + 1 < (prompt + response)[:, None])).long()
    scores = torch.randn(B, generator=gen) * 2
    return Rollout(ids, attn, action, scores)


def ptx_stream(seed=2):
    gen = torch.Generator().manual_seed(seed)

    def next_batch():
        ids = torch.randint(3, CFG.vocab_size, (11,), generator=gen)
        cu = torch.tensor([0, 4, 11], dtype=torch.int32)
        return Batch(ids, ids.clone(), cu, 7, 9)
    return next_batch


# ------------------------------------------------------------------------------------------------ plain torch
def plain_logprobs(model, ids, attn, temperature):
    logits = model(ids, attention_mask=attn, return_logits=True).logits.float() / temperature   # (B, S, V)
    logp = torch.log_softmax(logits, dim=-1)[:, :-1]
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def plain_experience(actor, ref, critic, ro, cfg):
    with torch.no_grad():
        old = plain_logprobs(actor, ro.input_ids, ro.attention_mask, cfg.temperature)
        ref_lp = plain_logprobs(ref, ro.input_ids, ro.attention_mask, cfg.temperature)
        values = critic(ro.input_ids, attention_mask=ro.attention_mask).values[:, :-1].float()
    B, T = old.shape
    adv = torch.zeros(B, T)
    for b in range(B):
        steps = [t for t in range(T) if ro.action_mask[b, t]]
        rewards = {t: -cfg.kl_coef * float(old[b, t] - ref_lp[b, t]) for t in steps}
        if steps:
            rewards[steps[-1]] += float(ro.scores[b])
        next_v = next_a = 0.0
        for t in reversed(steps):
            a = rewards[t] + cfg.gamma * next_v - float(values[b, t]) + cfg.gamma * cfg.lam * next_a
            adv[b, t] = a
            next_v, next_a = float(values[b, t]), a
    returns = (adv + values) * ro.action_mask
    return old, values, adv, returns


def plain_ptx_loss(actor, batch):
    logits = actor(batch.input_ids, batch.cu_seqlens, return_logits=True).logits.float()
    cu = batch.cu_seqlens.tolist()
    losses = [F.cross_entropy(logits[s:e - 1], batch.labels[s + 1:e], reduction="sum") for s, e in zip(cu, cu[1:])]
    return torch.stack(losses).sum() / sum(e - s - 1 for s, e in zip(cu, cu[1:]))


def plain_iteration(actor, ref, critic, ro, cfg, gen, ptx, train_actor=True):
    old, old_values, adv, returns = plain_experience(actor, ref, critic, ro, cfg)
    a_opt = torch.optim.AdamW(actor.parameters(), lr=cfg.actor_lr, betas=tuple(cfg.betas), eps=1e-8,
                              weight_decay=cfg.weight_decay)
    c_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, betas=tuple(cfg.betas), eps=1e-8,
                              weight_decay=cfg.weight_decay)
    B = ro.input_ids.shape[0]
    for _ in range(cfg.ppo_epochs):
        for idx in torch.randperm(B, generator=gen).tensor_split(cfg.mini_batches):
            m = ro.action_mask[idx].float()
            if train_actor:
                logp = plain_logprobs(actor, ro.input_ids[idx], ro.attention_mask[idx], cfg.temperature)
                ratio = torch.exp(logp - old[idx])
                a = adv[idx]
                surrogate = torch.minimum(ratio * a, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * a)
                loss = -(surrogate * m).sum() / m.sum() + cfg.ptx_coef * plain_ptx_loss(actor, ptx())
                loss.backward()
                torch.nn.utils.clip_grad_norm_(actor.parameters(), cfg.grad_clip)
                a_opt.step()
                a_opt.zero_grad()
            v = critic(ro.input_ids[idx], attention_mask=ro.attention_mask[idx]).values[:, :-1]
            vloss = 0.5 * (((v - returns[idx]) ** 2) * m).sum() / m.sum()
            vloss.backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.grad_clip)
            c_opt.step()
            c_opt.zero_grad()
    return adv, returns


# ------------------------------------------------------------------------------------------------ tests
def assert_adam_close(ours, theirs, learner, lr, atol):
    """Parameters after the same Adam steps on both sides. Adam's first steps move every entry by about lr whatever
    its gradient's size, so an entry whose gradient is at the rounding level (which the two sides, and the ISAs,
    round differently) can step either way: at most 2 lr per step apart. Those entries are rare (one in 25,600
    under ATEN_CPU_CAPABILITY=avx2, none under AVX-512); every other entry agrees to ``atol`` + 1e-4 relative."""
    steps = max(int(s["step"]) for s in learner.optimizer.state.values())
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        diff = (p - q).detach().abs()
        assert float(diff.max()) <= 2 * lr * steps, name
        assert float((diff > atol + 1e-4 * q.detach().abs()).float().mean()) <= 1e-3, name


def learners(actor, critic, cfg):
    """The production optimizer step: a Learner each (one process, fp32: FusedAdamW without master weights)."""
    rt = Runtime(torch.device("cpu"), torch.float32)
    return ppo_learner(actor, rt, cfg, cfg.actor_lr), ppo_learner(critic, rt, cfg, cfg.critic_lr)


def test_action_logprobs_match_full_logits():
    actor, _, _ = micro_models()
    ro = random_rollout()
    with torch.no_grad():
        got = action_logprobs(actor, ro.input_ids, ro.attention_mask, temperature=0.7)
        want = plain_logprobs(actor, ro.input_ids, ro.attention_mask, 0.7) * ro.attention_mask[:, 1:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("epochs,mini_batches", [(1, 1), (2, 3)])
def test_iteration_equals_plain_torch(epochs, mini_batches):
    cfg = PPOConfig(actor_lr=1e-3, critic_lr=2e-3, weight_decay=0.01, ppo_epochs=epochs, mini_batches=mini_batches,
                    grad_clip=0.5, kl_coef=0.05, temperature=0.9)
    actor, ref, critic = micro_models()
    # The reference differs from the actor, as after a round, so the KL term is not zero.
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ro = random_rollout()
    plain = [copy.deepcopy(m) for m in (actor, critic)]

    # Both sides on the reference math, so the comparison checks the iteration, not the rounding of the CPU kernels
    # (each tested against the reference on its own), which Adam's first step amplifies in parameters whose
    # gradient is near zero.
    with ik.use_backend(attention="reference", linear="reference", rms_norm="reference", swiglu="reference",
                        rotary="reference", linear_cross_entropy="reference"):
        exp = make_experience(actor, ref, critic, ro, cfg)
        assert float(exp.kl.abs().sum()) > 0
        a_learner, c_learner = learners(actor, critic, cfg)
        stats = ppo_iteration(a_learner, ref, c_learner, ro, cfg, torch.Generator().manual_seed(7),
                              ptx_stream())
        adv, returns = plain_iteration(plain[0], ref, plain[1], ro, cfg, torch.Generator().manual_seed(7),
                                       ptx_stream())

    torch.testing.assert_close(exp.advantages, adv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(exp.returns, returns, rtol=1e-4, atol=1e-5)
    assert_adam_close(actor, plain[0], a_learner, cfg.actor_lr, atol=2e-6)
    assert_adam_close(critic, plain[1], c_learner, cfg.critic_lr, atol=2e-6)
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(actor.parameters(), ref.parameters()))
    assert moved > 1e-3                                 # the iteration did update the actor
    assert {"policy_loss", "ptx_loss", "value_loss", "clip_fraction", "kl", "score"} <= set(stats)
    assert stats["score"] == pytest.approx(float(ro.scores.mean()))


def test_critic_warmup_leaves_the_actor_unchanged():
    cfg = PPOConfig(actor_lr=1e-2, critic_lr=1e-2, mini_batches=2)
    actor, ref, critic = micro_models()
    before_actor = {k: v.clone() for k, v in actor.state_dict().items()}
    before_critic = {k: v.clone() for k, v in critic.state_dict().items()}
    a_learner, c_learner = learners(actor, critic, cfg)
    ro = random_rollout()
    stats = ppo_iteration(a_learner, ref, c_learner, ro, cfg, torch.Generator().manual_seed(0), ptx_stream(),
                          train_actor=False)
    for k, v in actor.state_dict().items():
        assert torch.equal(v, before_actor[k]), k
    assert all(p.grad is None for p in actor.parameters())
    assert not a_learner.optimizer.state                              # no step, no moments
    assert any(not torch.equal(v, before_critic[k]) for k, v in critic.state_dict().items())
    assert "policy_loss" not in stats and stats["value_loss"] > 0
    # The warmup's own plain twin moves the critic the same way.
    _, _, plain_critic = micro_models()
    plain_iteration(copy.deepcopy(actor), ref, plain_critic, ro, cfg, torch.Generator().manual_seed(0), ptx_stream(),
                    train_actor=False)
    assert_adam_close(critic, plain_critic, c_learner, cfg.critic_lr, atol=1e-5)   # 0.1% of a step at lr 1e-2
