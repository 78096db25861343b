"""A deterministic embedded corpus of synthetic, verifiable tasks (no network, no files).

Document ``i`` of a stream is a pure function of (seed, stream name, i, task mix): the stream is random-access,
so a resumed run regenerates exactly the documents it would have seen. Tasks, each with an answer a tiny model
can learn from a few hundred thousand tokens:

- facts:      a fixed "world" of invented people (name -> city, job, pet, favourite colour) stated in prose and
              asked back as Q/A; the same facts recur across documents, so they are memorized.
- arithmetic: additions, subtractions and small multiplications with their results.
- copy / reverse / sort: short letter or digit strings and their transform.
- passkey:    the passkey-retrieval format (a 5-digit key hidden in filler at a random depth, asked at the end),
              which needs attention over the whole document: the long-context skill.

The held-out split uses a different stream name, so its documents are new draws from the same tasks (same
world of facts, new questions, numbers and strings).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator

TASKS = ("facts", "arithmetic", "copy", "reverse", "sort", "passkey")

_SYLLABLES = ("ka", "lo", "mi", "ra", "to", "ve", "zu", "ne", "shi", "da", "por", "fen", "gal", "mur", "tes", "bri")
_CITIES = ("Vesk", "Ormel", "Tandra", "Quillon", "Baseth", "Korvi", "Lunmar", "Pellica", "Ystra", "Dovrin")
_JOBS = ("baker", "potter", "pilot", "gardener", "tailor", "doctor", "painter", "sailor", "miner", "teacher")
_PETS = ("cat", "dog", "parrot", "goat", "rabbit", "turtle", "owl", "horse")
_COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"

PASSKEY_INTRO = "There is a pass key hidden in this text. Find it and remember it.\n"
PASSKEY_FILLER = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
)
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_needle(key: str) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key."


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    job: str
    pet: str
    color: str


def make_world(seed: int, num_people: int = 24) -> list[Person]:
    """The fixed set of facts of the corpus (depends on the seed only)."""
    rng = random.Random(f"world:{seed}")
    names: set[str] = set()
    people = []
    while len(people) < num_people:
        first = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()
        last = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        name = f"{first} {last}"
        if name in names:
            continue
        names.add(name)
        people.append(Person(name, rng.choice(_CITIES), rng.choice(_JOBS), rng.choice(_PETS), rng.choice(_COLORS)))
    return people


def _facts(rng: random.Random, world: list[Person]) -> str:
    lines = []
    for p in rng.sample(world, 3):
        statements = [f"{p.name} lives in {p.city}.", f"{p.name} works as a {p.job}.",
                      f"{p.name} has a {p.pet}.", f"The favourite colour of {p.name} is {p.color}."]
        rng.shuffle(statements)
        lines.append(" ".join(statements[:rng.randint(2, 4)]))
    for p in rng.sample(world, 3):
        q, a = rng.choice((("Where does {} live?", p.city), ("What does {} work as?", f"a {p.job}"),
                           ("What pet does {} have?", f"a {p.pet}"), ("What is the favourite colour of {}?", p.color)))
        lines.append(f"Q: {q.format(p.name)} A: {a}.")
    return "\n".join(lines)


def _arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(4, 8)):
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            lines.append(f"{a} * {b} = {a * b}")
        else:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            if op == "-" and b > a:
                a, b = b, a
            lines.append(f"{a} {op} {b} = {a + b if op == '+' else a - b}")
    return "\n".join(lines)


def _random_word(rng: random.Random, lo: int = 3, hi: int = 8) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(lo, hi)))


def _string_task(rng: random.Random, kind: str) -> str:
    lines = []
    for _ in range(rng.randint(3, 6)):
        if kind == "sort":
            nums = [rng.randint(0, 9) for _ in range(rng.randint(3, 7))]
            lines.append(f"sort: {' '.join(map(str, nums))} -> {' '.join(map(str, sorted(nums)))}")
        else:
            w = _random_word(rng)
            lines.append(f"{kind}: {w} -> {w if kind == 'copy' else w[::-1]}")
    return "\n".join(lines)


def passkey_parts(rng: random.Random, approx_chars: int, depth: float | None = None) -> tuple[str, str]:
    """(prompt, answer) of a passkey document about ``approx_chars`` characters long.

    The needle is placed after ``depth`` (0..1) of the filler sentences (random when None). The prompt ends with
    ``"... The pass key is"``; the answer is the key with its leading space, ``" 12345"``.
    """
    key = f"{rng.randint(10000, 99999)}"
    needle = passkey_needle(key)
    budget = max(0, approx_chars - len(PASSKEY_INTRO) - len(needle) - len(PASSKEY_QUESTION) - 8)
    filler: list[str] = []
    used = 0
    while used < budget:
        s = " " + rng.choice(PASSKEY_FILLER)
        filler.append(s)
        used += len(s)
    if depth is None:
        depth = rng.random()
    at = round(depth * len(filler))
    prompt = PASSKEY_INTRO + "".join(filler[:at]) + needle + "".join(filler[at:]) + PASSKEY_QUESTION
    return prompt, f" {key}"


def make_task_fn(task: str, world: list[Person], passkey_chars: tuple[int, int]) -> Callable[[random.Random], str]:
    if task == "facts":
        return lambda rng: _facts(rng, world)
    if task == "arithmetic":
        return _arithmetic
    if task in ("copy", "reverse", "sort"):
        return lambda rng: _string_task(rng, task)
    if task == "passkey":
        lo, hi = passkey_chars

        def passkey(rng: random.Random) -> str:
            prompt, answer = passkey_parts(rng, rng.randint(lo, hi))
            return prompt + answer + "."
        return passkey
    raise ValueError(f"mix: unknown task {task!r} (tasks: {', '.join(TASKS)})")


class SyntheticCorpus:
    """Random-access stream of synthetic documents: ``corpus[i]`` is document i; iterate from any index."""

    def __init__(self, seed: int = 0, mix: dict[str, float] | None = None, split: str = "train",
                 passkey_chars: tuple[int, int] = (200, 1000), num_people: int = 24):
        mix = dict(mix) if mix else {t: 1.0 for t in TASKS if t != "passkey"}
        for task, w in mix.items():
            if task not in TASKS:
                raise ValueError(f"mix: unknown task {task!r} (tasks: {', '.join(TASKS)})")
            if not isinstance(w, (int, float)) or w < 0:
                raise ValueError(f"mix: weight of {task!r} must be a number >= 0, got {w!r}")
        if sum(mix.values()) <= 0:
            raise ValueError("mix: at least one task needs a positive weight")
        lo, hi = passkey_chars
        if not 0 < lo <= hi:
            raise ValueError(f"passkey_chars must satisfy 0 < min <= max, got {passkey_chars}")
        self.seed, self.split = seed, split
        self.world = make_world(seed, num_people)
        self._tasks = [t for t in mix if mix[t] > 0]
        self._weights = [float(mix[t]) for t in self._tasks]
        self._fns = {t: make_task_fn(t, self.world, passkey_chars) for t in self._tasks}

    def __getitem__(self, i: int) -> str:
        if i < 0:
            raise IndexError(i)
        rng = random.Random(f"{self.seed}:{self.split}:{i}")
        task = rng.choices(self._tasks, self._weights)[0]
        return self._fns[task](rng)

    def iter_from(self, start: int) -> Iterator[str]:
        i = start
        while True:
            yield self[i]
            i += 1
