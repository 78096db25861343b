"""Correct-vs-wrong pairs on the PPO tasks whose wrong replies are the policy's own: the reward model learns to
reject the mistakes PPO will sample, before PPO starts.

InternLM2 trains its reward models on comparisons of the models' own replies; our online rounds' slow path labels
the policy's replies with the task checkers (``train.rlhf.hacking.label_comparisons``). Doing the same before the
first round (issue 21: "train the RM on them from the start") matters because a near miss made up by rule
(``train.data.preference.corrupt``) is not what the policy gets wrong: measured on the demo's SFT model, a reward
model trained on made-up near misses only (89% right on held-out made-up pairs) ranked the answer above the
policy's own wrong samples in 52-79% of cases on the upper-case tasks ("ZWAp", "ODJHUX" for "ZWAP", "ODJHUY"), so
PPO against it raised its reward and lowered accuracy (docs/alignment.md).

    pool      ``prompts`` prompts of ``TaskPreferences(seed, split, tasks)``; ``samples`` replies to each from the
              policy at the rollout's temperature / top-p, one generator per (prompt, sample) seeded from
              (seed, split, prompt, sample): the pool is a pure function of the model and the seed
    item i    prompt i mod ``prompts``; chosen = the reference answer (a correct sample is exactly it); rejected =
              one of the prompt's wrong samples, drawn from (seed, split, i), or a made-up near miss where the
              policy got every sample right
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Sequence

import torch

from train.data.chat import Message, encode_prompt
from train.data.preference import PreferencePair, TaskPreferences, corrupt
from train.rlhf.rollouts import Sampler, response_text


@dataclass(frozen=True)
class PolicySamplingConfig:
    prompts: int            # pool size: distinct prompts sampled
    samples: int            # replies sampled per prompt
    temperature: float      # the PPO rollout's settings, so the wrong replies are those PPO will meet
    top_p: float
    max_new_tokens: int


class PolicyTaskPreferences:
    """Random-access ``PreferencePair`` items (module docstring); ``wrong_share`` is the share of pool prompts with
    at least one wrong sample (the policy's sampled error rate per prompt, reported with the stage's data)."""

    def __init__(self, policy, tokenizer, seed: int, split: str, tasks: Sequence[str], domain: str,
                 sampling: PolicySamplingConfig, batch: int = 64):
        if sampling.prompts < 1 or sampling.samples < 1:
            raise ValueError(f"reward.task_pairs_policy_prompts and task_pairs_policy_samples must be >= 1, got "
                             f"{sampling.prompts} and {sampling.samples}")
        self.seed, self.split = seed, split
        self.base = TaskPreferences(seed, split, tasks, domain)
        self.pairs = [self.base[i] for i in range(sampling.prompts)]
        self.wrong = self._sample(policy, tokenizer, sampling, batch)
        self.wrong_share = sum(bool(w) for w in self.wrong) / len(self.wrong)

    @torch.inference_mode()
    def _sample(self, policy, tokenizer, s: PolicySamplingConfig, batch: int) -> list[list[str]]:
        """Per pool prompt: its distinct wrong sampled replies, in sampling order."""
        stop = (tokenizer.special_ids["<|im_end|>"], tokenizer.eos_id)
        device = next(policy.parameters()).device
        sampler = Sampler(policy, max_batch=batch)
        jobs = [(p, k) for p in range(len(self.pairs)) for k in range(s.samples)]
        wrong: list[list[str]] = [[] for _ in self.pairs]
        for start in range(0, len(jobs), batch):
            chunk = jobs[start:start + batch]
            ids = [encode_prompt(list(self.pairs[p].prompt), tokenizer) for p, _ in chunk]
            gens = [torch.Generator(device).manual_seed(zlib.crc32(f"{self.seed}:{self.split}:{p}:{k}".encode()))
                    for p, k in chunk]
            for (p, _), c in zip(chunk, sampler(ids, s.max_new_tokens, s.temperature, s.top_p, stop, gens)):
                text = response_text(tokenizer, c.tokens, stop).strip()
                if text and text != self.pairs[p].chosen[-1].content and text not in wrong[p]:
                    wrong[p].append(text)
        return wrong

    def __getitem__(self, i: int) -> PreferencePair:
        n = i % len(self.pairs)
        pair, wrong = self.pairs[n], self.wrong[n]
        rng = random.Random(f"policy-pref:{self.seed}:{self.split}:{i}")
        rejected = rng.choice(wrong) if wrong else corrupt(rng, pair.chosen[-1].content)
        return PreferencePair(pair.domain, pair.prompt, pair.chosen, (Message("assistant", rejected),))
