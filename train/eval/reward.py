"""Reward-model evaluation: held-out pair accuracy per domain, score statistics, and a score histogram.

A pair is right when the chosen response scores strictly higher than the rejected one (a tie is wrong, so a
model that ignores its input scores 0, not 50%).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from train.data.items import Item, budget_groups, collate_items


@torch.no_grad()
def pair_scores(model, items: Sequence[Item], device: torch.device, batch_tokens: int = 8192) -> dict:
    """{"chosen": (P,), "rejected": (P,), "group": (P,)} host tensors for the pairs in ``items``."""
    model = getattr(model, "module", model)
    chosen, rejected, groups = [], [], []
    for group in budget_groups(list(items), batch_tokens):
        batch = collate_items(group).to(device)
        scores = model(batch.input_ids, batch.cu_seqlens, max_seqlen=batch.max_seqlen).scores.float().cpu()
        chosen.append(scores[0::2])
        rejected.append(scores[1::2])
        groups += batch.groups
    return {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected), "group": torch.tensor(groups)}


def pair_accuracy(scores: dict, domains: Sequence[str]) -> dict[str, float]:
    """Accuracy over all pairs and per domain, and the score statistics the report shows."""
    right = scores["chosen"] > scores["rejected"]
    out = {"pair_acc": float(right.float().mean())}
    for k, name in enumerate(domains):
        sel = scores["group"] == k
        if bool(sel.any()):
            out[f"pair_acc_{name}"] = float(right[sel].float().mean())
    both = torch.cat([scores["chosen"], scores["rejected"]])
    out["score_mean"] = float(both.mean())
    out["score_std"] = float(both.std()) if both.numel() > 1 else 0.0
    out["score_abs_max"] = float(both.abs().max())
    out["margin_mean"] = float((scores["chosen"] - scores["rejected"]).mean())
    return out


def plot_score_histogram(scores: dict, domains: Sequence[str], path: str, bound: float = 5.0) -> str:
    """Chosen and rejected score histograms, one panel per domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, axes = plt.subplots(1, len(domains), figsize=(4 * len(domains), 3.2), squeeze=False)
    bins = torch.linspace(-bound, bound, 41).tolist()
    for ax, (k, name) in zip(axes[0], enumerate(domains)):
        sel = scores["group"] == k
        ax.hist(scores["chosen"][sel].clamp(-bound, bound).tolist(), bins=bins, alpha=0.6, label="chosen")
        ax.hist(scores["rejected"][sel].clamp(-bound, bound).tolist(), bins=bins, alpha=0.6, label="rejected")
        ax.set_title(f"domain: {name}")
        ax.set_xlabel("score")
    axes[0][0].set_ylabel("pairs")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def histogram_table(scores: dict, domains: Sequence[str], edges: Sequence[float] = (-5, -2, -1, 0, 1, 2, 5)) -> str:
    """The histogram as a markdown table (counts of chosen / rejected scores per bin and domain)."""
    head = ["| domain | side | " + " | ".join(f"[{a:g}, {b:g})" for a, b in zip(edges, edges[1:])) + " |",
            "|---|---|" + "---|" * (len(edges) - 1)]
    rows = []
    for k, name in enumerate(domains):
        sel = scores["group"] == k
        for side in ("chosen", "rejected"):
            s = scores[side][sel]
            counts = [int(((s >= a) & (s < b)).sum()) for a, b in zip(edges, edges[1:])]
            rows.append(f"| {name} | {side} | " + " | ".join(map(str, counts)) + " |")
    return "\n".join(head + rows)


def plot_reward_training(records: list[dict], out_dir: str) -> dict[str, str]:
    """loss.png of a reward run: the total loss on a linear axis (the barrier term makes it negative near the
    end, which a log axis cannot show) and the training pair accuracy per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    if not train:
        return {}
    os.makedirs(out_dir, exist_ok=True)
    steps = [r["step"] for r in train]
    fig, (ax, acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax.plot(steps, [r["loss"] for r in train], lw=1.0)
    ax.axhline(0.0, color="gray", lw=0.6, ls=":")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("ranking loss + penalty x log barrier")
    ax.set_title("reward model: training loss")
    acc.plot(steps, [r.get("pair_acc", float("nan")) for r in train], lw=1.0)
    acc.set_ylim(0, 1.02)
    acc.set_xlabel("optimizer step")
    acc.set_title("training pair accuracy")
    fig.tight_layout()
    path = os.path.join(out_dir, "loss.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"loss": path}
