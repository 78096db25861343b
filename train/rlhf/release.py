"""Which PPO round's policy is released: InternLM2 "choose[s] the best checkpoints on the validation sets for
release" (section 4.3). Each round's policy answers the validation prompts greedily (``rollout.validation_prompts``,
a split apart from the held-out prompts the summary reports on, so the choice does not see the reported figure);
the released round is the round the fast path did not flag with the highest validation accuracy, the earliest of
equals (the least drift from SFT for the same accuracy). Without validation prompts the last round is released,
and when every round was flagged, none is (0: the SFT policy)."""
from __future__ import annotations


def released_round(evals: list[dict], episodes: list[dict]) -> int:
    """``evals``: per evaluation, SFT first (round i at index i), each with ``validation_accuracy`` when validation
    prompts are set; ``episodes``: per round, ``{"round", "findings"}``. Returns the released round (0 = SFT)."""
    rounds = len(evals) - 1
    if rounds < 1:
        return 0
    flagged = {ep["round"] for ep in episodes if ep["findings"]}
    if "validation_accuracy" not in evals[-1]:
        return rounds
    clean = [r for r in range(1, rounds + 1) if r not in flagged]
    if not clean:
        return 0
    return max(clean, key=lambda r: (evals[r]["validation_accuracy"], -r))
