"""One PPO iteration split into its three phases — generation, log-probs (experience), training — ours beside the
same iteration done the common way: transformers' ``generate`` and log-probs from full (unfused) logits.

Ours: the PPO stage's sampler (``models.serving.ContinuousBatchingGenerator``: paged KV pool, one batched
decode call per layer, CUDA-graph decode on GPU; top-p 0.9, one seeded generator per prompt as the PPO stage
samples), ``train.rlhf.iteration.make_experience`` (actor and
reference log-probs through ``ik.fused_linear_logprobs``, critic values), ``ppo_update`` (one epoch, one mini-batch:
clipped policy loss on fused log-probs, value loss, FusedAdamW on both). Peer: a transformers ``LlamaForCausalLM``
holding the same weights (our checkpoint in Llama layout) for the actor and the reference: ``generate(do_sample,
top_p=0.9)``, log-probs as ``log_softmax(logits).gather``, the same losses on those, torch AdamW. The critic is our
``InternLM2ForScore`` in both (transformers has no per-token value model of this layout), so the training phase
compares the actor side. Every reply is forced to the full length (no stop token) so both sides do the same work.
Cases: the tiny preset on CPU (16 prompts x 32 tokens + 32 new), the 1.8B shape on a GPU (64 x 256 + 128 new: the
transformers side generates the 128 tokens one eager step at a time, which bounds the case's time).
Metric: tokens/s of the phase (generated tokens for generation, prompt + reply tokens for the others).
"""
from __future__ import annotations

import copy
import dataclasses
import tempfile

import pytest
import torch

from benchmarks.common import OURS, device, record
from models import InternLM2Config, InternLM2ForCausalLM
from models.internlm2 import InternLM2ForScore
from train.parallel import Runtime
from train.rlhf.iteration import PPOConfig, Rollout, make_experience, ppo_learner, ppo_update
from train.rlhf.losses import policy_loss, value_loss
from train.rlhf.rollouts import Sampler

PEER = "transformers-generate-unfused"
# case: (preset, vocab, prompts, prompt tokens, new tokens, GPU only)
CASES = {"tiny-cpu": ("tiny", 272, 16, 32, 32, False), "1_8b-gpu": ("1_8b", 92544, 64, 256, 128, True)}
PHASES = ("generation", "logprobs", "training")
_built: dict[tuple[str, str], dict] = {}


def _rollout(prompt: torch.Tensor, reply: torch.Tensor) -> Rollout:
    ids = torch.cat([prompt, reply], dim=1)
    B, S = ids.shape
    action = torch.zeros(B, S - 1, dtype=torch.long, device=ids.device)
    action[:, prompt.shape[1] - 1:] = 1
    return Rollout(ids, torch.ones_like(ids), action, torch.randn(B, device=ids.device))


def _build(case: str, impl: str) -> dict:
    if (case, impl) in _built:
        return _built[(case, impl)]
    _built.clear()                                        # one setup alive at a time (GPU memory)
    preset, vocab, B, P, N, _ = CASES[case]
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    config = dataclasses.replace(InternLM2Config.preset(preset), vocab_size=vocab)
    torch.manual_seed(0)
    with torch.device(dev):
        actor = InternLM2ForCausalLM(config).to(dtype)
        critic = InternLM2ForScore(config).to(dtype)
    cfg = PPOConfig(actor_lr=1e-6, critic_lr=5e-6)
    prompt = torch.randint(3, vocab, (B, P), device=dev)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr)
    s = {"work": {"generation": B * N, "logprobs": B * (P + N), "training": B * (P + N)}}
    if impl == OURS:
        reference = copy.deepcopy(actor).eval()
        rt = Runtime(dev, dtype)
        actor_learner = ppo_learner(actor, rt, cfg, cfg.actor_lr)
        critic_learner = ppo_learner(critic, rt, cfg, cfg.critic_lr)
        prompts = prompt.tolist()
        sampler = Sampler(actor, max_batch=B)

        gens = [torch.Generator(device=dev).manual_seed(i) for i in range(B)]

        def generate():
            out = sampler(prompts, N, temperature=1.0, top_p=0.9, stop_ids=(), generators=gens)
            return torch.tensor([c.tokens for c in out], device=dev)

        rollout = _rollout(prompt, generate())
        exp = make_experience(actor, reference, critic, rollout, cfg)
        perm = torch.Generator().manual_seed(0)
        s["generation"] = generate
        s["logprobs"] = lambda: make_experience(actor, reference, critic, rollout, cfg)
        s["training"] = lambda: ppo_update(actor_learner, critic_learner, exp, cfg, perm)
    else:
        from transformers import LlamaForCausalLM

        with tempfile.TemporaryDirectory() as d:
            actor.save_pretrained(d, layout="llama")
            hf = LlamaForCausalLM.from_pretrained(d, torch_dtype=dtype).to(dev)
            hf_ref = LlamaForCausalLM.from_pretrained(d, torch_dtype=dtype).to(dev).eval()
        del actor
        hf.generation_config.pad_token_id = 2
        actor_opt = torch.optim.AdamW(hf.parameters(), lr=cfg.actor_lr, fused=dev.type == "cuda")
        mask = torch.ones_like(prompt)

        def generate():
            with torch.no_grad():
                out = hf.generate(prompt, attention_mask=mask, do_sample=True, top_p=0.9, top_k=0, temperature=1.0,
                                  max_new_tokens=N, min_new_tokens=N)
            return out[:, P:]

        def logprobs(model, ids):
            logits = model(ids).logits[:, :-1].float()
            return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)

        rollout = _rollout(prompt, generate())
        ids, m = rollout.input_ids, rollout.action_mask

        def experience():
            with torch.no_grad():
                return (logprobs(hf, ids), logprobs(hf_ref, ids),
                        critic(ids, attention_mask=rollout.attention_mask).values[:, :-1])

        old, _, old_values = experience()
        adv, ret = torch.randn_like(old), torch.randn_like(old)

        def train():
            loss, _ = policy_loss(logprobs(hf, ids), old, adv, m)
            loss.backward()
            actor_opt.step()
            actor_opt.zero_grad(set_to_none=True)
            v = critic(ids, attention_mask=rollout.attention_mask).values[:, :-1]
            value_loss(v, old_values, ret, m).backward()
            critic_opt.step()
            critic_opt.zero_grad(set_to_none=True)

        s.update(generation=generate, logprobs=experience, training=train)
    _built[(case, impl)] = s
    return s


@pytest.mark.parametrize("impl", [OURS, PEER])
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("case", list(CASES))
def test_ppo_iteration_phase(benchmark, case, phase, impl):
    gpu_only = CASES[case][-1]
    dev = device()
    if gpu_only != (dev.type == "cuda"):
        pytest.skip("GPU case: runs in benchmarks/gpu_check.sh" if gpu_only else "CPU case")
    if impl == PEER:
        pytest.importorskip("transformers")
    try:
        s = _build(case, impl)
        record(benchmark, s[phase], group=f"PPO iteration {case}: {phase}", impl=impl, metric="tokens/s",
               work=s["work"][phase], unit_scale=1.0)
    except torch.OutOfMemoryError:
        _built.clear()
        pytest.skip(f"{impl} runs out of GPU memory in {phase}")
