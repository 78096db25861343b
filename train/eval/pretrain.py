"""Evaluation: held-out perplexity, and a needle-in-a-haystack (passkey retrieval) probe with a heatmap.

Perplexity: the held-out documents are packed like training data (per-document attention) and scored with the
summed token loss; ppl = exp(total loss / target tokens).

Passkey: for each context length L and depth d, ``trials`` prompts of L tokens hide a 5-digit key at depth d of the
filler and end with "What is the pass key? The pass key is"; the model greedily generates and a trial is correct
when the generated text starts with the key. Chance level for a 5-digit key is 1e-5. The probe is the needle suite's
single-needle retrieval (train.eval.needle) in the corpus's passkey format, with held-out keys and filler.
"""
from __future__ import annotations

import json
import math
import os
import random
from typing import Sequence

import torch

from train.data.corpus import passkey_parts
from train.data.packing import PackedRow, collate, pack_documents
from train.data.tokenizer import Tokenizer
from train.eval.needle import PASSKEY, passkey_grid


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, rows: Sequence[PackedRow], device: torch.device,
                 batch_tokens: int = 8192) -> dict:
    """{"loss": nats per target token, "ppl": exp(loss), "tokens": targets scored} over the packed rows."""
    if not rows:
        raise ValueError("rows: the held-out set is empty (raise data.heldout_docs)")
    model = _unwrap(model)
    total, targets = 0.0, 0
    group: list[PackedRow] = []
    size = 0

    def flush():
        nonlocal total, targets
        batch = collate(group).to(device)
        out = model(batch.input_ids, batch.cu_seqlens, max_seqlen=batch.max_seqlen, labels=batch.labels,
                    loss_reduction="sum")
        total += float(out.loss)
        targets += batch.num_targets

    for row in rows:
        if group and size + len(row.tokens) > batch_tokens:
            flush()
            group, size = [], 0
        group.append(row)
        size += len(row.tokens)
    flush()
    loss = total / targets
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": targets}


def heldout_rows(texts: Sequence[str], tokenizer: Tokenizer, seq_len: int) -> list[PackedRow]:
    return pack_documents([tokenizer.encode(t, add_bos=True, add_eos=True) for t in texts], seq_len)


def check_passkey_lengths(tokenizer: Tokenizer, lengths: Sequence[int]) -> None:
    """Every probe length must hold the prompt without filler (intro, needle, question); else ValueError."""
    bare, _ = passkey_parts(random.Random(0), 1, 0.5, probe=True)
    shortest = len(tokenizer.encode(bare, add_bos=True))
    too_short = [n for n in lengths if n < shortest]
    if too_short:
        raise ValueError(f"eval.passkey_lengths: {too_short} are shorter than the passkey prompt without filler "
                         f"({shortest} tokens with this tokenizer)")



def passkey_probe(model: torch.nn.Module, tokenizer: Tokenizer, lengths: Sequence[int], depths: Sequence[float],
                  trials: int, seed: int = 0, batch_tokens: int = 65536) -> dict:
    """Accuracy per (length, depth): {"lengths", "depths", "accuracy": [[acc per depth] per length], "samples"} —
    the needle suite's smallest grid (``train.eval.needle.passkey_grid``: prompts of exactly ``length`` tokens,
    greedy generation in groups of at most ``batch_tokens`` prompt tokens) in the corpus's passkey format with held-out keys."""
    check_passkey_lengths(tokenizer, lengths)
    return passkey_grid(_unwrap(model), tokenizer, lengths, depths, trials, seed, PASSKEY, batch_tokens)


def passkey_means(result: dict) -> dict[str, float]:
    """{str(length): accuracy averaged over the depths} of a passkey_probe() result."""
    return {str(n): sum(a) / len(a) for n, a in zip(result["lengths"], result["accuracy"])}


def passkey_table(result: dict) -> str:
    """Markdown: one row per context length, one column per depth, plus the mean."""
    depths = result["depths"]
    head = "| length | " + " | ".join(f"depth {d:.0%}" for d in depths) + " | mean |"
    sep = "|---" * (len(depths) + 2) + "|"
    rows = [head, sep]
    for length, accs in zip(result["lengths"], result["accuracy"]):
        rows.append(f"| {length} | " + " | ".join(f"{a:.0%}" for a in accs) + f" | {sum(accs) / len(accs):.0%} |")
    return "\n".join(rows)


def plot_passkey(result: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = torch.tensor(result["accuracy"]).T  # (depths, lengths)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * acc.shape[1], 1.2 + 0.6 * acc.shape[0]))
    im = ax.imshow(acc.numpy(), vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(acc.shape[1]), [str(n) for n in result["lengths"]])
    ax.set_yticks(range(acc.shape[0]), [f"{d:.0%}" for d in result["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(j, i, f"{acc[i, j]:.0%}", ha="center", va="center", fontsize=8)
    ax.set_title(f"passkey retrieval accuracy ({result['trials']} trials per cell)")
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_passkey(result: dict, out_dir: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "passkey.json"), "table": os.path.join(out_dir, "passkey.md"),
             "heatmap": os.path.join(out_dir, "passkey.png")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1)
    with open(paths["table"], "w") as f:
        f.write(passkey_table(result) + "\n")
    plot_passkey(result, paths["heatmap"])
    return paths
