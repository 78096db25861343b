"""The PPO stage's report section and plots (``runs/<name>/ppo_report.md``, ``ppo_*.png``): held-out task
accuracy, mean reward and KL of SFT vs each round, the reward model's per-set accuracy per version, the
reward-hacking episodes the fast path caught, and the time split of an iteration."""
from __future__ import annotations

import json
import os

from train.rlhf.release import released_round
from train.stages.ppo import PPOResult


def read_records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def plot_ppo(records: list[dict], out_dir: str) -> dict[str, str]:
    """ppo_reward.png, ppo_kl.png, ppo_accuracy.png, ppo_length.png: per PPO iteration, rounds marked, held-out
    points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r for r in records if r["kind"] == "ppo"]
    evals = [r for r in records if r["kind"] == "eval"]
    restarts = [r for r in records if r["kind"] == "restart"]
    if not its:
        return {}
    x = [r["iteration"] for r in its]
    ends = {}
    for r in its:
        ends[r["round"]] = r["iteration"]
    eval_x = [ends.get(e["round"], 0) for e in evals]
    paths = {}
    for key, it_key, eval_key, label in (("reward", "rm_score", "reward", "reward-model score"),
                                         ("kl", "kl", "kl", "KL to the reference (nats / reply)"),
                                         ("accuracy", "accuracy", "accuracy", "task accuracy"),
                                         ("length", "response_length", "length", "reply length (tokens)")):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(x, [r[it_key] for r in its], lw=1.2, label="rollouts (sampled)")
        ax.plot(eval_x, [e[eval_key] for e in evals], "o-", label="held-out (greedy)" if key != "kl" else "held-out")
        for rnd, end in ends.items():
            ax.axvline(end + 0.5, color="gray", ls=":", lw=0.8)
            ax.text(end + 0.5, ax.get_ylim()[1], f" end of round {rnd}", va="top", fontsize=7, color="gray")
        for r in restarts:
            ax.text(ends.get(r["round"] - 1, 0) + 0.5, ax.get_ylim()[0], f" round {r['round']} restarts from "
                    f"{r['from']}", va="bottom", fontsize=7, color="tab:red")
        ax.set_xlabel("PPO iteration")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths[key] = os.path.join(out_dir, f"ppo_{key}.png")
        fig.savefig(paths[key], dpi=110)
        plt.close(fig)
    return paths


def checker_weight(run_dir: str) -> float:
    """The run's ``ppo.checker_weight`` (its ppo_config.json, written by every run_ppo before its rounds)."""
    with open(os.path.join(run_dir, "ppo_config.json")) as f:
        return float(json.load(f)["ppo"]["checker_weight"])


def ppo_summary(state) -> dict:
    """The ``ppo`` part of runs/summary.json: held-out greedy accuracy and reply length (tokens) of the SFT model and
    of the final policy — the released round's (``train.rlhf.release``: the best unflagged round on the validation
    prompts; the last round without them) — with the last round's accuracy beside it, the rounds the fast path
    flagged, and whether the last round is one of them."""
    flagged = [ep["round"] for ep in state.episodes if ep["findings"]]
    released = released_round(state.evals, state.episodes)
    sft, final = state.evals[0], state.evals[released]
    return {"accuracy": {"sft": sft["accuracy"], "final": final["accuracy"], "last_round": state.evals[-1]["accuracy"]},
            "length": {"sft": sft["length"], "final": final["length"]}, "released_round": released,
            "flagged_rounds": flagged, "final_flagged": bool(state.episodes) and state.episodes[-1]["round"] in flagged}


def _mark(ok: bool) -> str:
    return "met" if ok else "**not met**"


def reward_sentence(checker_weight: float) -> str:
    """What PPO's reward is (``ppo.checker_weight``: the checker's term beside the reward model's score)."""
    if checker_weight == 0:
        return ("the reward model scores right answers above wrong ones, so PPO reinforces the right answers the SFT "
                "policy samples")
    return (f"the reward is the reward model's score plus {checker_weight:g} x the task checker's verdict (+1 right, "
            "-1 wrong; `ppo.checker_weight`), so PPO reinforces the right answers the SFT policy samples even where "
            "the reward model orders them wrongly, and the reward model still decides among the rest")


def effect_lines(summary: dict, checker_weight: float = 0.0) -> list[str]:
    """The section's lead: the effect PPO exists for, and the demo's bars."""
    acc, length = summary["accuracy"], summary["length"]
    gain = acc["final"] - acc["sft"]
    ratio = length["final"] / max(length["sft"], 1e-9)
    flagged = summary["flagged_rounds"]
    return [f"**Effect:** held-out greedy task accuracy {acc['sft']:.1%} (SFT) -> {acc['final']:.1%} for the released "
            f"policy, round {summary['released_round']} ({gain:+.1%}; bar >= +10 points, {_mark(gain >= 0.10)}; the "
            "round the fast path did not flag with the best greedy accuracy on separate validation prompts, as "
            f"InternLM2 releases the best checkpoint on its validation sets; after the last round: "
            f"{acc['last_round']:.1%}): {reward_sentence(checker_weight)}. A reward-hacking episode: "
            f"the fast path flagged round(s) {flagged or 'none'} (bar: at least one, {_mark(bool(flagged))}); the "
            f"last round {'was flagged' if summary['final_flagged'] else 'was not flagged'} (bar: not flagged, "
            f"{_mark(not summary['final_flagged'])}); final reply length {length['final']:.1f} tokens vs SFT's "
            f"{length['sft']:.1f} ({ratio:.2f}x; bar <= 1.3x, {_mark(ratio <= 1.3)}).", ""]


def report_lines(result: PPOResult, plots: dict[str, str], root: str = "") -> list[str]:
    st = result.state
    records = read_records(result.run_dir)
    lines = ["## PPO in rounds (COOL RLHF): accuracy rises, a reward hack is caught and patched", "",
             *effect_lines(ppo_summary(st), checker_weight(result.run_dir)),
             "Held-out prompts (the synthetic chat tasks, exact-match checkers). Accuracy and reward from greedy "
             "replies, reward under the reward model the policy was trained against in that round; KL to the "
             "reference is the mean over sampled replies of the summed per-token log-ratio (k1).", "",
             "| model | accuracy | mean reward | reply length (tokens) | KL to reference | sampled accuracy | "
             "validation accuracy (release choice) |",
             "|---|---|---|---|---|---|---|"]
    for e in st.evals:
        val = f"{e['validation_accuracy']:.1%}" if "validation_accuracy" in e else "-"
        lines.append(f"| {e['name']} | {e['accuracy']:.1%} | {e['reward']:+.3f} | {e['length']:.1f} | {e['kl']:.3f} "
                     f"| {e['sampled_accuracy']:.1%} | {val} |")
    sets = sorted({k for e in st.evals for k in e["rm_accuracy"] if k != "all"}) + ["all"]
    lines += ["", "### Reward model: held-out pair accuracy per set, per version", "",
              "`correct>wrong`, `short>padded`: pairs on held-out PPO prompts (the first is what the demo's "
              "hackable first reward model, fine-tuned to prefer the SFT policy's own wrong replies, gets wrong); "
              "other sets: the conditional RM's domains.", "",
              "| version | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    version = 0
    lines.append("| v0 (the first RM) | " + " | ".join(f"{st.evals[0]['rm_accuracy'][s]:.0%}" for s in sets) + " |")
    for e in st.evals[1:]:
        if "rm_accuracy_after_refresh" in e:
            version += 1
            acc = e["rm_accuracy_after_refresh"]
            lines.append(f"| v{version} (refreshed after {e['name']}) | " + " | ".join(f"{acc[s]:.0%}" for s in sets) + " |")
    lines += ["", "### Reward hacking: fast path (rules) and slow path (labelled comparisons)", ""]
    for ep in st.episodes:
        if ep["findings"]:
            for f in ep["findings"]:
                lines.append(f"- round {ep['round']}: **{f['pattern']}** — {f['evidence']}; "
                             f"{len(f['sample_indices'])} offending replies")
            for ex in ep["examples"][:2]:
                lines.append(f"  - e.g. `{ex[:120]}`")
        else:
            lines.append(f"- round {ep['round']}: no hacking pattern detected")
        lines.append(f"  - {ep['fast_pairs']} targeted pairs (fast path), {ep['slow_pairs']} labelled comparisons "
                     "(slow path)")
    lines += episode_lines(st)
    its = [r for r in records if r["kind"] == "ppo"]
    if its:
        n = len(its)
        gen = sum(r["time_generation_s"] for r in its) / n
        logp = sum(r["time_logprobs_s"] for r in its) / n
        train = sum(r["time_train_s"] for r in its) / n
        lines += ["", "### Time per PPO iteration (mean)", "",
                  "| generation + scoring | log-probs / values (experience) | training | total |", "|---|---|---|---|",
                  f"| {gen:.2f} s | {logp:.2f} s | {train:.2f} s | {gen + logp + train:.2f} s |"]
    if plots:
        lines += ["", "Plots: " + ", ".join(f"![{k}]({os.path.relpath(p, root) if root else p})"
                                            for k, p in plots.items())]
    lines.append("")
    return lines


def episode_lines(st) -> list[str]:
    """Each flagged round followed by another: caught (the rule and its figures) -> patched (the refreshed RM) ->
    the next round's policy (recovered when the fast path does not flag it again and accuracy does not fall)."""
    by_name = {e["name"]: e for e in st.evals}
    sft = st.evals[0]
    restarts = {r["round"]: r["from"] for r in st.restarts}
    flagged = {ep["round"]: ep for ep in st.episodes if ep["findings"]}
    lines = []
    for k, ep in sorted(flagged.items()):
        now, nxt = by_name.get(f"round {k}"), by_name.get(f"round {k + 1}")
        if now is None or nxt is None or "rm_accuracy_after_refresh" not in now:
            continue
        lines += ["", f"### The reward-hacking episode of round {k}: caught, patched, recovered?", ""]
        for f in ep["findings"]:
            lines.append(f"1. **Caught** after round {k} by the fast path's `{f['pattern']}` rule: {f['evidence']} "
                         f"({len(f['sample_indices'])} offending replies); held-out greedy replies "
                         f"{now['length']:.1f} tokens (SFT {sft['length']:.1f}), accuracy {now['accuracy']:.1%} "
                         f"(SFT {sft['accuracy']:.1%}), KL to the reference {now['kl']:.2f}.")
        before, after = now["rm_accuracy"], now["rm_accuracy_after_refresh"]
        text = (f"2. **Patched:** {ep['fast_pairs']} targeted pairs and {ep['slow_pairs']} labelled comparisons; "
                f"the refreshed RM's held-out `short>padded` accuracy {before.get('short>padded', 0):.0%} -> "
                f"{after.get('short>padded', 0):.0%}, `correct>wrong` {before.get('correct>wrong', 0):.0%} -> "
                f"{after.get('correct>wrong', 0):.0%}")
        rescored = now.get("reward_under_refreshed_rm")
        if rescored:
            text += (f"; round {k}'s held-out replies scored {now['reward']:+.2f} by the RM they were trained "
                     f"against (SFT's replies {now['sft_reward']:+.2f}: a premium of "
                     f"{now['reward'] - now['sft_reward']:+.2f} for the hack), {rescored['this round']:+.2f} by the "
                     f"refreshed one (SFT's {rescored['sft']:+.2f}: "
                     f"{rescored['this round'] - rescored['sft']:+.2f})")
        lines.append(text + ".")
        start = restarts.get(k + 1)
        again = k + 1 in flagged
        recovered = not again and nxt["accuracy"] >= now["accuracy"]
        lines.append(f"3. **Round {k + 1}** (started from the policy of {start or f'round {k}'}, trained against "
                     f"the refreshed RM): reply length {nxt['length']:.1f} tokens (round {k}: {now['length']:.1f}, "
                     f"SFT {sft['length']:.1f}), accuracy {nxt['accuracy']:.1%}, mean reward {nxt['reward']:+.2f}, "
                     f"KL to the reference {nxt['kl']:.2f}; the fast path "
                     f"{'flagged it again' if again else 'found no pattern'} -> "
                     f"**{'recovered' if recovered else 'not recovered'}**.")
    return lines


def write_ppo_report(result: PPOResult, plots_enabled: bool = True) -> str:
    plots = plot_ppo(read_records(result.run_dir), result.run_dir) if plots_enabled else {}
    path = os.path.join(result.run_dir, "ppo_report.md")
    with open(path, "w") as f:
        f.write("\n".join(report_lines(result, plots)))
    return path
