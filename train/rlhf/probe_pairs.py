"""Preference pairs built from verifiable prompts, for the demo's deliberately hackable first reward model and for
measuring the reward model on held-out prompts.

- ``padded``: the correct answer followed by random extra words (a reply the checker calls wrong that a
  length-biased reward model would pay for; the ``short>padded`` probe set).
- ``wrong``: a near miss of the correct answer (a number off by one, a word with two letters swapped).
- ``mislabelled_pairs``: the demo's deliberately hackable first reward model's extra data: the policy's own wrong
  replies labelled *better* than the answer (comparisons with their labels swapped, an annotation error).
- ``probe_pairs``: held-out pairs in two sets, ``correct>wrong`` and ``short>padded`` (the fix the fast path should
  teach), labelled with the key ``set`` so ``pair_accuracy`` reports each.
- ``task_pairs``: records of ``train.data.preference.TaskPreferences`` (correct beats a near-miss wrong reply on the
  PPO prompts' tasks: what the reward stage trained on), replayed at each refresh so it keeps checking answers.
- ``preference_pairs``: records of ``train.data.preference.SyntheticPreferences`` (the conditional RM's own synthetic
  domains): the held-out split for its per-domain accuracy, the train split replayed at each refresh.
"""
from __future__ import annotations

import random

from train.data.preference import SyntheticPreferences, TaskPreferences
from train.rlhf.hacking import answer_pairs
from train.rlhf.rollouts import Generated, Prompt

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def padded(rng: random.Random, answer: str) -> str:
    words = ["".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, 6))) for _ in range(rng.randint(3, 8))]
    return f"{answer} {' '.join(words)}"


def wrong(rng: random.Random, answer: str) -> str:
    if answer.lstrip("-").isdigit():
        return str(int(answer) + rng.choice((-1, 1)))
    chars = list(answer)
    letters = [i for i, c in enumerate(chars) if c.isalpha()]
    if len(letters) >= 2:
        i, j = rng.sample(letters, 2)
        if chars[i] != chars[j]:
            chars[i], chars[j] = chars[j], chars[i]
            return "".join(chars)
    return answer + "x"


def _record(prompt: Prompt, chosen: str, rejected: str, source: str, set_name: str | None = None) -> dict:
    rec = {"domain": prompt.domain, "prompt": prompt.message_dicts(), "chosen": chosen, "rejected": rejected,
           "source": source}
    if set_name:
        rec["set"] = set_name
    return rec


def mislabelled_pairs(batches: list[Generated]) -> list[dict]:
    """One pair per distinct (prompt, wrong reply) of ``batches`` (the policy's sampled replies, checked):
    chosen = the wrong reply, rejected = the reference answer. The mistakes are the policy's own, so PPO samples
    them from its first iteration: a reward model fine-tuned on these pays for what the policy already does wrong,
    and PPO can exploit it within a round (made-up biases, e.g. padded replies, were never sampled at the demo's
    learning rate and so never exploited: docs/rlhf.md)."""
    samples = [s for g in batches for s in g.samples()]
    answers = {p.prompt_id: p.answer for g in batches for p in g.prompts}
    # The slow path's pairs (each distinct wrong reply rejected against the answer) with their labels swapped.
    return [p | {"chosen": p["rejected"], "rejected": p["chosen"], "source": "demo:mislabelled"}
            for p in answer_pairs(samples, answers, "")]


def probe_pairs(prompts: list[Prompt], seed: int) -> list[dict]:
    rng = random.Random(f"probe:{seed}")
    out = []
    for p in prompts:
        out.append(_record(p, p.answer, wrong(rng, p.answer), "probe", "correct>wrong"))
        out.append(_record(p, p.answer, padded(rng, p.answer), "probe", "short>padded"))
    return out


def preference_pairs(seed: int, count: int, split: str = "heldout") -> list[dict]:
    prefs = SyntheticPreferences(seed, split)
    out = []
    for i in range(count):
        pair = prefs[i]
        out.append({"domain": pair.domain, "prompt": [{"role": m.role, "content": m.content} for m in pair.prompt],
                    "chosen": pair.chosen[-1].content, "rejected": pair.rejected[-1].content, "source": "probe"})
    return out


def task_pairs(seed: int, tasks, domain: str, count: int, split: str = "train") -> list[dict]:
    prefs = TaskPreferences(seed, split, tasks, domain)
    out = []
    for i in range(count):
        pair = prefs[i]
        out.append({"domain": pair.domain, "prompt": [{k: v for k, v in vars(m).items() if v is not None}
                                                      for m in pair.prompt],
                    "chosen": pair.chosen[-1].content, "rejected": pair.rejected[-1].content, "source": "replay:task"})
    return out
