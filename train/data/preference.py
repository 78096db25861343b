"""Preference data for the conditional reward model (COOL RLHF): records, conditions, the reward token, pairs.

A record (jsonl, one per line):
    {"domain": "helpful", "prompt": [messages] or "a user message",
     "chosen": "assistant reply" or [messages], "rejected": "assistant reply" or [messages]}
Messages in either spelling of ``train.data.chat``; a string prompt is one user message, a string response one
assistant message.

Conditioning (reward side only): the reward model reads
    render([system: conditions[domain]] + prompt + response) + <reward token>
The condition prompt comes from a config table domain -> text; the policy being trained (SFT, PPO actor) never
sees it. With no table (``conditions = {}``) the model is an ordinary, unconditional reward model. The score is
read at the reward token, the last token of each sequence (``InternLM2ForScore`` reads the last position).

The reward token: InternLM2's reward models use ``[UNUSED_TOKEN_130]`` (id 92527 of the 92544-entry vocabulary);
a SentencePiece tokenizer must have that piece. The byte tokenizer uses the first unused id under its six chat
specials (vocab_size - 7: 265 for the default 272 entries), which no text ever encodes to.

The embedded synthetic set (``SyntheticPreferences``) is built so that conditioning is *necessary*: records 2k and
2k + 1 hold the same prompt and the same two responses, one under "concise" (the bare answer wins) and one
under "helpful" (the answer with its explanation wins). Without the condition the two labels contradict each
other and no model beats chance on them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Mapping

from train.data.chat import Message, normalize, render
from train.data.items import Item
from train.data.packing import jsonl_records
from train.data.tokenizer import ByteTokenizer, Tokenizer

INTERNLM2_REWARD_PIECE = "[UNUSED_TOKEN_130]"
SYNTHETIC_DOMAINS = ("concise", "helpful")
# The demo's condition table (configs/reward_*.toml carry their own; these are the defaults for the synthetic set).
DEFAULT_CONDITIONS = {
    "concise": "Judge the reply for brevity: the shortest correct answer is best.",
    "helpful": "Judge the reply for helpfulness: a correct answer that explains itself is best.",
}


def reward_token_id(tokenizer: Tokenizer) -> int:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.vocab_size - 7
    sp = getattr(tokenizer, "_sp", None)
    if sp is not None:
        i = int(sp.PieceToId(INTERNLM2_REWARD_PIECE))
        if i != tokenizer.unk_id:
            return i
    raise ValueError(f"tokenizer: no reward token (InternLM2's {INTERNLM2_REWARD_PIECE!r} piece is missing)")


@dataclass(frozen=True)
class PreferencePair:
    domain: str
    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]


def _response(value, where: str) -> list:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list) and value:
        return value
    raise ValueError(f"{where}: a response must be a string or a non-empty list of messages")


def parse_pair(record, where: str) -> PreferencePair:
    """Validate one record (module docstring); errors name ``where``."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be an object")
    missing = [k for k in ("domain", "prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    domain = record["domain"]
    if not isinstance(domain, str) or not domain:
        raise ValueError(f"{where}: domain must be a non-empty string")
    prompt = record["prompt"]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"{where}: prompt must be a string or a non-empty list of messages")
    tools = record.get("tools")
    n_prompt = len(normalize(prompt, tools, f"{where}: prompt"))
    sides = []
    for side in ("chosen", "rejected"):
        msgs = normalize(prompt + _response(record[side], f"{where}: {side}"), tools, f"{where}: prompt + {side}")
        if msgs[-1].role != "assistant":
            raise ValueError(f"{where}: {side} must end with an assistant turn (the reply being scored)")
        sides.append(tuple(msgs[n_prompt:]))
    if sides[0] == sides[1]:
        raise ValueError(f"{where}: chosen and rejected are the same")
    return PreferencePair(domain, tuple(msgs[:n_prompt]), sides[0], sides[1])


def read_preferences(path: str) -> list[PreferencePair]:
    out = [parse_pair(record, where) for where, record in jsonl_records(path)]
    if not out:
        raise ValueError(f"{path}: no preference pairs")
    return out


def conditioned(pair: PreferencePair, response: tuple[Message, ...], conditions: Mapping[str, str]) -> list[Message]:
    """The conversation the reward model scores: the domain's condition prompt first (when a table is given)."""
    msgs = list(pair.prompt) + list(response)
    if not conditions:
        return msgs
    if pair.domain not in conditions:
        raise ValueError(f"reward.conditions: no condition prompt for domain {pair.domain!r} "
                         f"(known: {', '.join(sorted(conditions))})")
    return [Message("system", conditions[pair.domain])] + msgs


def score_ids(messages, tokenizer: Tokenizer, reward_id: int) -> list[int]:
    """Token ids the reward model scores: the rendered conversation, then the reward token."""
    return tokenizer.encode(render(messages)) + [reward_id]


def pair_item(pair: PreferencePair, tokenizer: Tokenizer, reward_id: int, conditions: Mapping[str, str],
              domains: tuple[str, ...], group: str | None = None) -> Item:
    """Chosen then rejected, as one packing item (labels unused by the reward loss: all -100); its group (what the
    evaluation reports it under) is ``group`` or else the pair's domain, an index into ``domains``."""
    seqs = []
    for response in (pair.chosen, pair.rejected):
        ids = score_ids(conditioned(pair, response, conditions), tokenizer, reward_id)
        seqs.append((ids, [-100] * len(ids)))
    group = group or pair.domain
    if group not in domains:
        raise ValueError(f"domain {group!r} is not in the evaluated domains {domains}")
    return Item(seqs, domains.index(group))


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))


class SyntheticPreferences:
    """Random-access synthetic pairs whose preference flips with the domain (module docstring)."""

    domains = SYNTHETIC_DOMAINS

    def __init__(self, seed: int = 0, split: str = "train"):
        self.seed, self.split = seed, split

    def __getitem__(self, i: int) -> PreferencePair:
        if i < 0:
            raise IndexError(i)
        rng = random.Random(f"pref:{self.seed}:{self.split}:{i // 2}")
        if rng.random() < 0.5:
            w = _word(rng)
            prompt = f"reverse: {w}"
            bare = w[::-1]
            explained = f"{bare}, because {w} read backwards is {bare}."
        else:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            prompt = f"What is {a} + {b}?"
            bare = str(a + b)
            explained = f"{a} + {b} = {bare}, so the answer is {bare}."
        domain = self.domains[i % 2]
        short, long = (Message("assistant", bare),), (Message("assistant", explained),)
        chosen, rejected = (short, long) if domain == "concise" else (long, short)
        return PreferencePair(domain, (Message("user", prompt),), chosen, rejected)


# ---------------------------------------------------------------------------------------------------------------
# Correct-vs-wrong pairs on the verifiable chat tasks (the PPO prompts' tasks)

CORRECT_OVER_WRONG = "correct>wrong"    # the evaluation group of these pairs (beside the domains)
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def corrupt(rng: random.Random, answer: str) -> str:
    """A wrong reply close to ``answer``, of the kinds a small policy produces: a number off by 1-3 (or another
    small number), one character replaced, dropped or doubled, two characters swapped, the reply cut short, one
    letter (or every letter) in the wrong case. Never equal to ``answer``.

    The case errors are the SFT model's most common miss on the upper-case tasks (``system``, ``multiturn``:
    "ZWAp" for "ZWAP"); a reward model that never saw one in a rejected reply scores it like the answer, and PPO
    against it learns nothing about case (issue 21, docs/alignment.md)."""
    for _ in range(16):
        if answer.lstrip("-").isdigit() and rng.random() < 0.7:
            out = str(max(0, int(answer) + rng.choice((-3, -2, -1, 1, 2, 3))))
        else:
            chars = list(answer)
            i = rng.randrange(len(chars))
            kind = rng.choice(("replace", "drop", "double", "swap", "cut", "case"))
            if kind == "case":
                if rng.random() < 0.25:
                    chars = list(answer.swapcase())
                else:
                    chars[i] = chars[i].swapcase()
            elif kind == "replace":
                pool = "0123456789" if chars[i].isdigit() else _ALPHABET.upper() if chars[i].isupper() else _ALPHABET
                chars[i] = rng.choice(pool)
            elif kind == "drop" and len(chars) > 1:
                del chars[i]
            elif kind == "double":
                chars.insert(i, chars[i])
            elif kind == "swap" and len(chars) > 1:
                j = min(i + 1, len(chars) - 1) if i + 1 < len(chars) else i - 1
                chars[i], chars[j] = chars[j], chars[i]
            elif kind == "cut" and len(chars) > 2:
                chars = chars[:rng.randint(1, len(chars) - 1)]
            out = "".join(chars)
        if out != answer and out.strip():
            return out
    return answer + "x"


class TaskPreferences:
    """Random-access pairs ``(task prompt, correct reply) > (same prompt, wrong reply)`` under ``domain``: the
    prompts are ``train.data.chat.SyntheticChats(seed, split, tasks)`` conversations without their final reply, the
    chosen reply is the task's reference answer, the rejected one ``corrupt(answer)``. These are the checker's
    labels (correct beats incorrect) that the slow path of the online rounds produces, available before PPO."""

    def __init__(self, seed: int, split: str, tasks, domain: str = "concise"):
        from train.data.chat import SyntheticChats

        self.chats = SyntheticChats(seed, f"pref-{split}", tasks)
        self.seed, self.split, self.domain = seed, split, domain

    def __getitem__(self, i: int) -> PreferencePair:
        conv = self.chats[i]
        rng = random.Random(f"task-pref:{self.seed}:{self.split}:{i}")
        prompt = tuple(conv.messages[:-1])
        return PreferencePair(self.domain, prompt, (Message("assistant", conv.answer),),
                              (Message("assistant", corrupt(rng, conv.answer)),))


class MixedPreferences:
    """Item i from ``second`` with probability ``share`` (drawn from (seed, i)), else from ``first``; each source
    indexed by its own running count is not needed: sources are random access, so item i of a source is used."""

    def __init__(self, first, second, share: float, seed: int):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"reward.task_pairs_share must be in [0, 1], got {share!r}")
        self.first, self.second, self.share, self.seed = first, second, share, seed

    def from_second(self, i: int) -> bool:
        return self.share > 0 and random.Random(f"pref-mix:{self.seed}:{i}").random() < self.share

    def __getitem__(self, i: int) -> PreferencePair:
        return self.second[i] if self.from_second(i) else self.first[i]
