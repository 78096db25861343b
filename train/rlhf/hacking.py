"""The online loop's two data paths between PPO rounds (COOL RLHF).

**Fast path** — rules over one round's samples find reward-hacking patterns, and each pattern becomes targeted
preference pairs for the reward model (the hacked response as *rejected*, a correct and short response to the
same prompt as *chosen*). The rules:

- ``length_explosion``: the round's mean response length exceeds ``length_ratio`` x the SFT baseline's mean; the
  offending samples are those longer than that bound.
- ``repetition``: the round's mean n-gram repeat rate (share of a response's n-grams that already occurred in it)
  exceeds the baseline's by ``repeat_margin``; the offending samples are those above baseline + margin.
- ``reward_up_accuracy_down``: across the evaluations so far, the mean reward rose by at least ``min_reward_gain``
  while the held-out task accuracy fell by at least ``min_accuracy_drop``; the offending samples are the incorrect
  ones that the reward model scored above the round's median.

**Slow path** — newly labelled comparisons: ``load_comparisons`` reads them from a jsonl file, and
``label_comparisons`` produces them for the embedded demo from SFT / early-PPO / late-PPO responses with the
synthetic tasks' checkers (a correct response beats an incorrect one; between two correct ones the shorter wins).

Pairs use the reward data's jsonl record ``{"domain", "prompt" (messages), "chosen", "rejected"}`` with a
``"source"`` key saying where the pair came from. This all runs on the host between rounds, on decoded samples.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field

PAIR_KEYS = ("domain", "prompt", "chosen", "rejected")


@dataclass
class Sample:
    """One prompt's response from a policy, as the fast and slow paths see it."""
    prompt_id: str
    domain: str
    prompt: list[dict]                  # the conversation before the response (chat messages)
    response: str
    tokens: list[int]                   # the response's token ids
    reward: float                       # the reward model's score
    correct: bool | None = None         # the task checker's verdict; None when the task has no checker


@dataclass
class HackingConfig:
    length_ratio: float = 1.5           # length_explosion: round mean > ratio x baseline mean
    ngram: int = 3                      # repetition: n of the n-grams
    repeat_margin: float = 0.15         # repetition: round mean repeat rate > baseline + margin
    min_reward_gain: float = 0.2        # reward_up_accuracy_down: reward rose at least this much ...
    min_accuracy_drop: float = 0.05     # ... while accuracy fell at least this much
    min_pairs: int = 20                 # targeted pairs per detected pattern (InternLM2: tens per pattern)
    max_pairs: int = 100


@dataclass
class Finding:
    pattern: str                        # length_explosion | repetition | reward_up_accuracy_down
    evidence: str                       # the numbers that triggered the rule
    sample_indices: list[int] = field(default_factory=list)   # offending samples of the round


def ngram_repeat_rate(tokens: list[int], n: int = 3) -> float:
    """Share of the n-grams of ``tokens`` that repeat an earlier n-gram of the same sequence (0 with < n+1)."""
    total = len(tokens) - n + 1
    if total <= 1:
        return 0.0
    unique = len({tuple(tokens[i:i + n]) for i in range(total)})
    return 1.0 - unique / total


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def length_explosion(samples: list[Sample], baseline: list[Sample], cfg: HackingConfig) -> Finding | None:
    base = _mean(len(s.tokens) for s in baseline)
    now = _mean(len(s.tokens) for s in samples)
    bound = cfg.length_ratio * base
    if not samples or not baseline or now <= bound:
        return None
    offenders = [i for i, s in enumerate(samples) if len(s.tokens) > bound]
    return Finding("length_explosion", f"mean response length {now:.1f} tokens vs SFT baseline {base:.1f} "
                   f"(> {cfg.length_ratio:g}x)", offenders)


def repetition(samples: list[Sample], baseline: list[Sample], cfg: HackingConfig) -> Finding | None:
    rate = [ngram_repeat_rate(s.tokens, cfg.ngram) for s in samples]
    base = _mean(ngram_repeat_rate(s.tokens, cfg.ngram) for s in baseline)
    now = _mean(rate)
    bound = base + cfg.repeat_margin
    if not samples or now <= bound:
        return None
    offenders = [i for i, r in enumerate(rate) if r > bound]
    return Finding("repetition", f"mean {cfg.ngram}-gram repeat rate {now:.2f} vs SFT baseline {base:.2f} "
                   f"(> +{cfg.repeat_margin:g})", offenders)


def reward_up_accuracy_down(samples: list[Sample], history: list[tuple[float, float]],
                            cfg: HackingConfig) -> Finding | None:
    """``history``: (mean reward, held-out accuracy) per evaluation, oldest first (the SFT model first)."""
    if len(history) < 2:
        return None
    (r0, a0), (r1, a1) = history[0], history[-1]
    if not (r1 - r0 >= cfg.min_reward_gain and a0 - a1 >= cfg.min_accuracy_drop):
        return None
    median = statistics.median(s.reward for s in samples) if samples else 0.0
    offenders = [i for i, s in enumerate(samples) if s.correct is False and s.reward > median]
    return Finding("reward_up_accuracy_down", f"mean reward {r0:+.2f} -> {r1:+.2f} while held-out accuracy "
                   f"{a0:.1%} -> {a1:.1%}", offenders)


def detect_hacking(samples: list[Sample], baseline: list[Sample], history: list[tuple[float, float]],
                   cfg: HackingConfig) -> list[Finding]:
    """Every rule of the module docstring, in order; only patterns with offending samples are returned."""
    found = [length_explosion(samples, baseline, cfg), repetition(samples, baseline, cfg),
             reward_up_accuracy_down(samples, history, cfg)]
    return [f for f in found if f is not None and f.sample_indices]


def _pair(chosen: Sample | str, rejected: Sample, source: str) -> dict:
    text = chosen if isinstance(chosen, str) else chosen.response
    return {"domain": rejected.domain, "prompt": rejected.prompt, "chosen": text, "rejected": rejected.response,
            "source": source}


def targeted_pairs(findings: list[Finding], samples: list[Sample], good: list[Sample],
                   references: dict[str, str], cfg: HackingConfig) -> list[dict]:
    """Preference pairs against each finding: rejected = an offending sample; chosen = the shortest correct
    response to the same prompt among ``good`` (e.g. the SFT baseline's samples), else the task's reference answer
    from ``references`` (prompt_id -> text). At most ``max_pairs`` per pattern; when a pattern has fewer offending
    samples than ``min_pairs``, they are reused with other chosen responses (other correct samples of the prompt)
    up to that count."""
    chosen_by_prompt: dict[str, list[str]] = {}
    for s in sorted(good, key=lambda s: len(s.tokens)):
        if s.correct is not False:
            chosen_by_prompt.setdefault(s.prompt_id, []).append(s.response)
    for pid, text in references.items():
        chosen_by_prompt.setdefault(pid, []).append(text)
    pairs: list[dict] = []
    seen: set[tuple[str, str]] = set()
    for finding in findings:
        made, rank = 0, 0
        # Pass r pairs every offender with its prompt's r-th best chosen response; pass 0 always runs.
        while rank == 0 or made < cfg.min_pairs:
            added = 0
            for i in finding.sample_indices:
                if made >= cfg.max_pairs:
                    break
                s = samples[i]
                options = [c for c in chosen_by_prompt.get(s.prompt_id, []) if c != s.response]
                if rank >= len(options) or (options[rank], s.response) in seen:
                    continue
                seen.add((options[rank], s.response))
                pairs.append(_pair(options[rank], s, f"fast_path:{finding.pattern}"))
                made += 1
                added += 1
            if added == 0 or made >= cfg.max_pairs:
                break
            rank += 1
    return pairs


def label_comparisons(groups: dict[str, list[Sample]]) -> list[dict]:
    """Slow path for the embedded demo: ``groups`` maps a source name (``sft``, ``early_ppo``, ``late_ppo``) to its
    samples; every two responses to one prompt from different sources are compared by the checker: correct beats
    incorrect, and between two correct ones the shorter wins; ties (both incorrect, or same length) are dropped."""
    by_prompt: dict[str, list[tuple[str, Sample]]] = {}
    for source, samples in groups.items():
        for s in samples:
            by_prompt.setdefault(s.prompt_id, []).append((source, s))
    pairs = []
    for entries in by_prompt.values():
        for i in range(len(entries)):
            for j in range(i + 1, len(entries)):
                (sa, a), (sb, b) = entries[i], entries[j]
                if sa == sb or a.correct is None or b.correct is None or a.response == b.response:
                    continue
                if a.correct != b.correct:
                    win, lose = (a, b) if a.correct else (b, a)
                elif a.correct and len(a.tokens) != len(b.tokens):
                    win, lose = (a, b) if len(a.tokens) < len(b.tokens) else (b, a)
                else:
                    continue
                pairs.append(_pair(win, lose, f"slow_path:{sa}_vs_{sb}"))
    return pairs


def load_comparisons(path: str) -> list[dict]:
    """Labelled comparisons from a jsonl file, one ``{"domain", "prompt", "chosen", "rejected"}`` per line
    (``prompt`` a list of chat messages). A bad line raises ValueError naming the file and line."""
    pairs = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: a comparison must be a JSON object")
            missing = [k for k in PAIR_KEYS if k not in record]
            if missing:
                raise ValueError(f"{where}: missing {', '.join(missing)}")
            if not isinstance(record["prompt"], list) or not all(isinstance(m, dict) for m in record["prompt"]):
                raise ValueError(f"{where}: prompt must be a list of chat messages")
            for k in ("domain", "chosen", "rejected"):
                if not isinstance(record[k], str):
                    raise ValueError(f"{where}: {k} must be a string")
            if record["chosen"] == record["rejected"]:
                raise ValueError(f"{where}: chosen and rejected are the same response")
            record.setdefault("source", f"slow_path:{path}")
            pairs.append(record)
    return pairs


def write_pairs(pairs: list[dict], path: str) -> None:
    with open(path, "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
