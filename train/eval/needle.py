"""A NeedleBench-style long-context suite: needles hidden in filler at a grid of context lengths x depths.

NeedleBench (OpenCompass) does not run offline (tiktoken's download, a hub dataset), so this is our own generator
of its three kinds, for base models (the prompt ends where the answer starts; greedy decoding):

- ``single_retrieval``: one needle "the secret code of <name> is <key>" at depth d; the question asks for it.
- ``multi_retrieval``: ``needles`` needles (different names and keys), the first at depth d and the others evenly
  spaced between it and the end; the question asks for all of them in order. Score: the fraction of keys that
  appear, in order, in the answer.
- ``multi_reasoning``: a chain "the code of A is k", "the code of B is the same as the code of A", ..., the links
  placed as in multi_retrieval; the question asks for the last name's code, which only following the chain gives.

in English and Chinese filler (``LANGS``). Names and keys come from RNG streams of their own (``needle:...``) and
the needle sentences ("secret code") never occur in the training corpus, so a hit is retrieval, not recall.

Length and depth: the prompt (``<s>`` included) is built to ``length`` tokens of the model's tokenizer — the
filler is cut character by character (binary search on the encoded length), so the length is exact up to one
character's tokens, well inside 1%. A needle goes in at the sentence boundary of the filler nearest to its depth
(a fraction of the filler's characters, 0 = right after the intro, 1 = right before the question).

The demo's passkey probe is this suite's smallest grid: ``PASSKEY`` is the pretraining corpus's passkey format (with
its held-out keys and filler) as a ``NeedleFormat``, and train/eval/pretrain.py's ``passkey_probe`` is ``passkey_grid``.

    python -m train.eval.needle --model runs/.../model --lengths 512,768,1024 --out runs/eval/needle
writes ``needle.json`` (the grid) and ``needle.png`` (one heatmap per kind and language).
"""
from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from train.data.corpus import PASSKEY_FILLER, PASSKEY_INTRO, PASSKEY_QUESTION, passkey_key, passkey_needle
from train.data.tokenizer import Tokenizer

KINDS = ("single_retrieval", "multi_retrieval", "multi_reasoning")


@dataclass(frozen=True)
class Language:
    """Filler and needle wording of one language. ``sentences`` are joined with ``joiner`` before each one."""
    intro: str
    sentences: tuple[str, ...]
    joiner: str
    code: Callable[[str, str], str]            # (name, key) -> "the secret code of name is key."
    same: Callable[[str, str], str]            # (name, previous) -> "the code of name is the same as previous's."
    ask_one: Callable[[str], str]              # name -> question ending where the key starts
    ask_all: Callable[[Sequence[str]], str]    # names -> question ending where the first key starts
    names: tuple[tuple[str, ...], tuple[str, ...]]   # (first parts, second parts)
    name_joiner: str


EN = Language(
    intro="Below is a long text. Some sentences in it state secret codes. Read it and answer the question.\n",
    sentences=(
        "The morning train left the station on time.", "Rain fell softly on the tin roof all night.",
        "A fisherman mended his nets by the harbour.", "The baker opened the shop before sunrise.",
        "Children played a long game of chess in the park.", "The museum added a room of old maps.",
        "Snow covered the mountain pass until late spring.", "A lighthouse keeper wrote letters every week.",
        "The orchard gave more apples than ever this year.", "Two students argued about a book in the library.",
        "The ferry crossed the lake twice each afternoon.", "A violinist practised scales in the empty hall.",
        "The farmer counted his sheep at dusk.", "Lanterns were hung along the narrow street.",
        "The old bridge was repaired with new planks.", "A merchant sold spices from a wooden cart.",
    ),
    joiner=" ",
    code=lambda name, key: f"The secret code of {name} is {key}.",
    same=lambda name, prev: f"The secret code of {name} is the same as the secret code of {prev}.",
    ask_one=lambda name: f"\nQuestion: what is the secret code of {name}? Answer: the secret code of {name} is",
    ask_all=lambda names: ("\nQuestion: what are the secret codes of " + ", ".join(names)
                           + ", in this order? Answer: the codes are"),
    names=(("Aldo", "Berin", "Cosima", "Dario", "Elske", "Fintan", "Greta", "Hollis", "Ilse", "Joren"),
           ("Marwick", "Nettle", "Orrin", "Pask", "Quell", "Rendle", "Sorrow", "Tamsin", "Umber", "Vance")),
    name_joiner=" ",
)

ZH = Language(
    intro="下面是一段很长的文字，其中有些句子给出了秘密代码。请阅读并回答问题。\n",
    sentences=(
        "清晨的火车准时离开了车站。", "雨整夜轻轻地落在铁皮屋顶上。", "渔夫在港口边修补他的渔网。",
        "面包师在日出之前打开了店门。", "孩子们在公园里下了一盘很长的棋。", "博物馆新增了一间陈列旧地图的展厅。",
        "积雪覆盖山口一直到春末。", "灯塔看守人每周都写信。", "今年果园里的苹果比往年都多。",
        "两个学生在图书馆里争论一本书。", "渡船每天下午两次横渡湖面。", "小提琴手在空荡的大厅里练习音阶。",
        "农夫在黄昏时清点他的羊。", "狭窄的街道两旁挂起了灯笼。", "旧桥换上了新的木板。", "一位商人从木车上卖香料。",
    ),
    joiner="",
    code=lambda name, key: f"{name}的秘密代码是{key}。",
    same=lambda name, prev: f"{name}的秘密代码和{prev}的秘密代码相同。",
    ask_one=lambda name: f"\n问题：{name}的秘密代码是什么？回答：{name}的秘密代码是",
    ask_all=lambda names: "\n问题：按顺序说出" + "、".join(names) + "的秘密代码。回答：秘密代码依次是",
    names=(("赵", "钱", "孙", "李", "周", "吴", "郑", "王", "冯", "陈"),
           ("明远", "雪松", "海燕", "志刚", "若兰", "云飞", "静怡", "子墨", "晓峰", "慧娟")),
    name_joiner="",
)

LANGS = {"en": EN, "zh": ZH}


@dataclass(frozen=True)
class NeedleFormat:
    """One single-needle retrieval format: intro, filler sentences, the needle for a key, the question, the
    answer the model must produce for a key, and where keys come from."""
    intro: str
    sentences: tuple[str, ...]
    joiner: str
    needle: Callable[[str], str]
    question: str
    answer: Callable[[str], str]
    key: Callable[[random.Random], str] = field(default=lambda rng: f"{rng.randint(10000, 99999)}")


# The pretraining corpus's passkey format (train.data.corpus.passkey_parts) as the demo's probe reads it: the filler
# training never uses (PASSKEY_FILLER) and keys from the held-out fifth, so a hit is retrieval of an unseen key.
PASSKEY = NeedleFormat(intro=PASSKEY_INTRO, sentences=PASSKEY_FILLER, joiner=" ", needle=passkey_needle,
                       question=PASSKEY_QUESTION, answer=lambda key: f" {key}",
                       key=lambda rng: passkey_key(rng, probe=True))


@dataclass
class NeedleSample:
    ids: list[int]                 # the prompt, <s> first, ``length`` tokens
    text: str                      # the prompt text (without <s>)
    answers: list[str]             # keys the answer must contain, in order
    needle_chars: list[int]        # character offset of each needle in ``text``
    filler_span: tuple[int, int]   # [start, end) of the filler (needles included) in ``text``
    expect: str = ""               # the exact answer text (single needle: what the answer must start with)


def _filler(rng: random.Random, sentences: Sequence[str], joiner: str, chars: int) -> tuple[str, list[int]]:
    """At least ``chars`` characters of random sentences, each preceded by ``joiner``; and the sentence starts."""
    parts, starts, n = [], [], 0
    while n < chars:
        starts.append(n)
        s = joiner + rng.choice(sentences)
        parts.append(s)
        n += len(s)
    return "".join(parts), starts


def build_prompt(tokenizer: Tokenizer, length: int, intro: str, needles: Sequence[str], depths: Sequence[float],
                 question: str, sentences: Sequence[str], joiner: str, rng: random.Random) -> tuple[list[int], str,
                                                                                                   list[int], int]:
    """(ids, text, needle offsets in text, filler chars) of a ``length``-token prompt (``<s>`` included): intro,
    filler with needle i at the sentence boundary nearest depths[i] of the filler, question. ValueError when
    ``length`` cannot hold the prompt without filler."""
    if len(depths) != len(needles) or not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be one value in [0, 1] per needle, got {list(depths)}")
    fixed = len(tokenizer.encode(intro + "".join(joiner + n for n in needles) + question, add_bos=True))
    if length < fixed:
        raise ValueError(f"length {length} is shorter than the prompt without filler ({fixed} tokens)")
    sample = joiner.join(sentences)
    chars_per_token = len(sample) / max(1, len(tokenizer.encode(sample)))
    filler, starts = _filler(rng, sentences, joiner, int((length - fixed) * chars_per_token * 1.2) + 64)

    def assemble(n: int) -> tuple[str, list[int]]:
        cut = filler[:n]
        bounds = [s for s in starts if s <= n] + [n]
        at = [min(bounds, key=lambda b: abs(b - d * n)) for d in depths]   # nearest boundary to each depth
        order = sorted(range(len(needles)), key=lambda i: (at[i], i))
        text, offsets, prev = intro, [0] * len(needles), 0
        for i in order:
            text += cut[prev:at[i]]
            prev = at[i]
            offsets[i] = len(text)
            text += joiner + needles[i]
        return text + cut[prev:] + question, offsets

    def count(n: int) -> int:
        return len(tokenizer.encode(assemble(n)[0], add_bos=True))

    while count(len(filler)) < length:   # the estimate of characters per token was low: more filler
        more, more_starts = _filler(rng, sentences, joiner, len(filler))
        starts += [len(filler) + s for s in more_starts]
        filler += more
    lo, hi = 0, len(filler)              # the most filler characters whose prompt fits in ``length`` tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(mid) <= length:
            lo = mid
        else:
            hi = mid - 1
    text, offsets = assemble(lo)
    return tokenizer.encode(text, add_bos=True), text, offsets, lo


def _names(rng: random.Random, lang: Language, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        name = rng.choice(lang.names[0]) + lang.name_joiner + rng.choice(lang.names[1])
        if name not in out:
            out.append(name)
    return out


def _spread(depth: float, n: int) -> list[float]:
    """The first needle at ``depth``, the others evenly between it and the end."""
    return [depth + (1.0 - depth) * i / n for i in range(n)]


def make_sample(tokenizer: Tokenizer, kind: str, lang: str, length: int, depth: float, rng: random.Random,
                needles: int = 3) -> NeedleSample:
    """One prompt of ``kind`` in language ``lang`` (module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {', '.join(LANGS)}, got {lang!r}")
    if kind != "single_retrieval" and needles < 2:
        raise ValueError(f"needles must be >= 2 for {kind}, got {needles}")
    L = LANGS[lang]
    n = 1 if kind == "single_retrieval" else needles
    names = _names(rng, L, n)
    keys = [f"{rng.randint(10000, 99999)}" for _ in range(n)]
    if kind == "single_retrieval":
        texts, question, answers, expect = [L.code(names[0], keys[0])], L.ask_one(names[0]), keys[:1], keys[0]
    elif kind == "multi_retrieval":
        texts, question, answers = [L.code(a, k) for a, k in zip(names, keys)], L.ask_all(names), keys
        expect = ""
    else:
        texts = [L.code(names[0], keys[0])] + [L.same(b, a) for a, b in zip(names, names[1:])]
        question, answers, expect = L.ask_one(names[-1]), keys[:1], keys[0]
    ids, text, offsets, filler_chars = build_prompt(tokenizer, length, L.intro, texts, _spread(depth, n), question,
                                                    L.sentences, L.joiner, rng)
    span = (len(L.intro), len(text) - len(question))
    return NeedleSample(ids, text, answers, offsets, span, expect)


def passkey_sample(tokenizer: Tokenizer, length: int, depth: float, rng: random.Random,
                   fmt: NeedleFormat = PASSKEY) -> NeedleSample:
    """One single-needle prompt of ``fmt`` (default: the pretraining corpus's passkey format)."""
    key = fmt.key(rng)
    needle = fmt.needle(key)
    ids, text, offsets, _ = build_prompt(tokenizer, length, fmt.intro, [needle.removeprefix(fmt.joiner)], [depth],
                                         fmt.question, fmt.sentences, fmt.joiner, rng)
    answer = fmt.answer(key)
    return NeedleSample(ids, text, [answer.strip()], offsets, (len(fmt.intro), len(text) - len(fmt.question)), answer)


def score(sample: NeedleSample, generated: str, kind: str) -> float:
    """1/0 for single-answer kinds (the generation starts with the answer, leading space ignored when the expected
    answer has none); for multi_retrieval the fraction of keys found in order."""
    if kind != "multi_retrieval":
        exp = sample.expect
        return float(generated.startswith(exp) or generated.lstrip().startswith(exp.lstrip()))
    found, pos = 0, 0
    for key in sample.answers:
        at = generated.find(key, pos)
        if at < 0:
            break
        found += 1
        pos = at + len(key)
    return found / len(sample.answers)


# --------------------------------------------------------------------------------------------------------------
# Running a grid
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _generate(model, prompts: list[list[int]], max_new: int, stop: int, batch_tokens: int) -> list[list[int]]:
    """Greedy completions on the continuous-batching generator, in groups of at most ``batch_tokens`` tokens."""
    from models.serving import ContinuousBatchingGenerator

    model = getattr(model, "module", model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    start = 0
    while start < len(order):
        end, size = start, 0
        while end < len(order) and (end == start or size + len(prompts[order[end]]) + max_new <= batch_tokens):
            size += len(prompts[order[end]]) + max_new
            end += 1
        group = [order[i] for i in range(start, end)]
        longest = max(len(prompts[i]) for i in group) + max_new
        gen = ContinuousBatchingGenerator(model, max_batch=len(group), max_seq_len=longest, page_size=64,
                                          prefill_tokens=batch_tokens)
        for i, c in zip(group, gen.generate([prompts[i] for i in group], max_new, stop_token_ids=(stop,))):
            out[i] = c.tokens[:-1] if c.finish_reason == "stop" else c.tokens
        start = end
    return out


def run_grid(model, tokenizer: Tokenizer, make: Callable[[int, float, random.Random], NeedleSample],
             scorer: Callable[[NeedleSample, str], float], lengths: Sequence[int], depths: Sequence[float],
             trials: int, seed_key: str, max_new_tokens: int, batch_tokens: int = 65536) -> dict:
    """Mean score per (length, depth) over ``trials`` samples: {"lengths", "depths", "trials", "accuracy":
    [[per depth] per length], "samples": a few (prompt tail, answer, generated)}."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    cells, samples = [], []
    for length in lengths:
        for di, depth in enumerate(depths):
            for t in range(trials):
                samples.append(make(length, depth, random.Random(f"{seed_key}:{length}:{depth}:{t}")))
                cells.append((length, di))
    outputs = _generate(model, [s.ids for s in samples], max_new_tokens, tokenizer.eos_id, batch_tokens)
    acc = {(length, di): 0.0 for length in lengths for di in range(len(depths))}
    shown = []
    for s, cell, out in zip(samples, cells, outputs):
        text = tokenizer.decode(out)
        acc[cell] += scorer(s, text) / trials
        if len(shown) < 6 and cell[1] == len(depths) // 2:
            shown.append({"length": cell[0], "answer": (s.expect or " ".join(s.answers)).strip(), "generated": text})
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials,
            "accuracy": [[acc[(length, di)] for di in range(len(depths))] for length in lengths], "samples": shown}


def passkey_grid(model, tokenizer: Tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int,
                 seed: int = 0, fmt: NeedleFormat = PASSKEY, batch_tokens: int = 65536) -> dict:
    """The demo's passkey probe as the suite's smallest grid: single-needle retrieval in ``fmt`` (by default the
    corpus's passkey format with held-out keys and filler). Returns the probe's dict (``lengths``, ``depths``,
    ``trials``, ``accuracy``, ``samples``)."""
    n_new = max(len(tokenizer.encode(fmt.answer(fmt.key(random.Random(i))))) for i in range(8))
    return run_grid(model, tokenizer, lambda n, d, rng: passkey_sample(tokenizer, n, d, rng, fmt),
                    lambda s, text: float(text.startswith(s.expect)), lengths, depths, trials,
                    f"passkey-probe:{seed}", n_new, batch_tokens)


def needle_suite(model, tokenizer: Tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int,
                 kinds: Sequence[str] = KINDS, langs: Sequence[str] = tuple(LANGS), needles: int = 3,
                 seed: int = 0, batch_tokens: int = 65536) -> dict:
    """{kind: {lang: grid}} for every kind and language (``run_grid``'s dicts), plus "mean" per kind and lang."""
    out: dict = {}
    for kind in kinds:
        for lang in langs:
            n = 1 if kind == "single_retrieval" else needles
            max_new = len(tokenizer.encode(" " + ", ".join(["00000"] * n))) + 2
            grid = run_grid(model, tokenizer,
                            lambda length, d, rng, kind=kind, lang=lang: make_sample(tokenizer, kind, lang, length, d,
                                                                                     rng, needles),
                            lambda s, text, kind=kind: score(s, text, kind), lengths, depths, trials,
                            f"needle:{seed}:{kind}:{lang}", max_new, batch_tokens)
            flat = [a for row in grid["accuracy"] for a in row]
            grid["mean"] = sum(flat) / len(flat)
            out.setdefault(kind, {})[lang] = grid
    return out


def plot_suite(result: dict, path: str, title: str = "") -> str:
    """One heatmap (depth x length, accuracy 0..1) per kind (rows) and language (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(result)
    langs = sorted({lang for k in kinds for lang in result[k]})
    first = result[kinds[0]][langs[0]]
    w, h = 2.2 + 0.7 * len(first["lengths"]), 1.3 + 0.4 * len(first["depths"])
    fig, axes = plt.subplots(len(kinds), len(langs), figsize=(w * len(langs) + 1, h * len(kinds) + 0.6), squeeze=False,
                             constrained_layout=True)
    for r, kind in enumerate(kinds):
        for c, lang in enumerate(langs):
            ax, grid = axes[r][c], result[kind].get(lang)
            if grid is None:           # a kind run in one language only (the passkey format)
                ax.axis("off")
                continue
            acc = torch.tensor(grid["accuracy"]).T     # (depths, lengths)
            im = ax.imshow(acc.numpy(), vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(acc.shape[1]), [str(n) for n in grid["lengths"]], fontsize=7)
            ax.set_yticks(range(acc.shape[0]), [f"{d:.0%}" for d in grid["depths"]], fontsize=7)
            for i in range(acc.shape[0]):
                for j in range(acc.shape[1]):
                    ax.text(j, i, f"{acc[i, j]:.0%}", ha="center", va="center", fontsize=6)
            ax.set_title(f"{kind} ({lang}): {grid.get('mean', acc.mean().item()):.0%}", fontsize=8)
            if r == len(kinds) - 1:
                ax.set_xlabel("context length (tokens)", fontsize=7)
            if c == 0:
                ax.set_ylabel("needle depth", fontsize=7)
    fig.colorbar(im, ax=axes, fraction=0.03, label="accuracy")
    if title:
        fig.suptitle(title, fontsize=9)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: Sequence[str] | None = None) -> dict:
    from train.eval.loading import load_export

    p = argparse.ArgumentParser(prog="python -m train.eval.needle", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an exported model directory (config.json + safetensors)")
    p.add_argument("--tokenizer", default=None, help="'byte' or a SentencePiece model (default: the export's)")
    p.add_argument("--lengths", type=_ints, default=[512, 768, 1024])
    p.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--langs", default=",".join(LANGS))
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--needles", type=int, default=3)
    p.add_argument("--passkey", action="store_true", help="also run the corpus's passkey format (the demo probe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, help="output directory (needle.json, needle.png)")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    langs = [x for x in args.langs.split(",") if x]
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"--kinds: unknown kind {k!r} ({', '.join(KINDS)})")
    for x in langs:
        if x not in LANGS:
            raise ValueError(f"--langs: unknown language {x!r} ({', '.join(LANGS)})")
    model, tokenizer, device = load_export(args.model, args.tokenizer, args.device)
    result = needle_suite(model, tokenizer, args.lengths, args.depths, args.trials, kinds, langs, args.needles,
                          args.seed)
    if args.passkey:
        grid = passkey_grid(model, tokenizer, args.lengths, args.depths, args.trials, args.seed)
        flat = [a for row in grid["accuracy"] for a in row]
        result["passkey"] = {"en": {**grid, "mean": sum(flat) / len(flat)}}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "needle.json"), "w") as f:
        json.dump({"model": os.path.abspath(args.model), "device": str(device), "result": result}, f, indent=1,
                  ensure_ascii=False)
    plot_suite(result, os.path.join(args.out, "needle.png"), os.path.basename(os.path.normpath(args.model)))
    for kind, by_lang in result.items():
        print(f"{kind}: " + ", ".join(f"{lang} {g['mean']:.0%}" for lang, g in by_lang.items()))
    return result


if __name__ == "__main__":
    main()
