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
- induction:  ``<s> s s`` with a random span ``s`` of letters or digits (8-64 by default; ``induction_chars``),
              loss on the repeat only: the copy-from-context (induction) rows of the curriculum. A model trained
              on the mix alone never forms the two-head circuit that retrieval needs (find the earlier occurrence of
              the current text, copy what followed it); on these rows it is the only way to lower the loss. Short
              spans (4-24) form it in about half the tokens of 8-64 spans: with fewer symbols in the context, one
              matching token already points at the right place, so the gradient toward the circuit is cleaner.

Held out of training, for the passkey probe (``passkey_parts(..., probe=True)``): the keys whose CRC32 is
divisible by ``PROBE_KEY_MODULUS`` (training draws the others), and the five classic filler sentences
(``PASSKEY_FILLER``; training filler is composed from ``_FILLER_SUBJECTS`` x ``_FILLER_PREDICATES``), so a probe
hit is retrieval of a key in a context never seen in training, not recall.

The held-out split uses a different stream name, so its documents are new draws from the same tasks (same
world of facts, new questions, numbers and strings).
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

from train.data.packing import Document
from train.data.tokenizer import Tokenizer

TASKS = ("facts", "arithmetic", "copy", "reverse", "sort", "passkey", "induction", "induction_digits")

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
# Training filler: subject x predicate, none equal to a probe sentence (PASSKEY_FILLER).
_FILLER_SUBJECTS = ("The river", "The old house", "A small bird", "The market", "The wind", "My neighbour",
                    "The library", "The red door", "The garden", "The bridge", "The clock", "The road")
_FILLER_PREDICATES = ("is quiet today.", "was painted last spring.", "stands near the hill.", "looks calm.",
                      "is far away.", "was built long ago.", "opens at noon.", "is full of people.",
                      "moves slowly.", "is made of stone.", "never sleeps.", "is bright in the morning.")
TRAIN_FILLER = tuple(f"{a} {b}" for a in _FILLER_SUBJECTS for b in _FILLER_PREDICATES)
PROBE_KEY_MODULUS = 5          # one key in five is held out for the probe
INDUCTION_SPAN = (8, 64)       # default characters (= byte tokens) of the span of an induction row
# induction: letters, digits, spaces and punctuation (67 symbols; the alphabet of the curriculum study this follows);
# induction_digits: ten symbols, so the circuit must match longer prefixes, as keys like 48813 need.
INDUCTION_ALPHABETS = {"induction": _LETTERS + _LETTERS.upper() + "0123456789     .,",
                       "induction_digits": "0123456789"}


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


def is_probe_key(key: str) -> bool:
    """Whether a passkey is held out for the probe (a fixed pseudo-random fifth of all keys)."""
    return zlib.crc32(key.encode()) % PROBE_KEY_MODULUS == 0


def passkey_key(rng: random.Random, probe: bool) -> str:
    """A 5-digit key from the probe's held-out set (``probe``) or from the training set (the rest)."""
    while True:
        key = f"{rng.randint(10000, 99999)}"
        if is_probe_key(key) == probe:
            return key


def passkey_parts(rng: random.Random, approx_chars: int, depth: float | None = None,
                  probe: bool = False) -> tuple[str, str]:
    """(prompt, answer) of a passkey document about ``approx_chars`` characters long.

    The needle is placed after ``depth`` (0..1) of the filler sentences (random when None). The prompt ends with
    ``"... The pass key is"``; the answer is the key with its leading space, ``" 12345"``. ``probe``: a held-out
    key and the held-out filler sentences (the probe's); otherwise a training key and training filler.
    """
    key = passkey_key(rng, probe)
    needle = passkey_needle(key)
    budget = max(0, approx_chars - len(PASSKEY_INTRO) - len(needle) - len(PASSKEY_QUESTION) - 8)
    sentences = PASSKEY_FILLER if probe else TRAIN_FILLER
    filler: list[str] = []
    used = 0
    while used < budget:
        s = " " + rng.choice(sentences)
        filler.append(s)
        used += len(s)
    if depth is None:
        depth = rng.random()
    at = round(depth * len(filler))
    prompt = PASSKEY_INTRO + "".join(filler[:at]) + needle + "".join(filler[at:]) + PASSKEY_QUESTION
    return prompt, f" {key}"


def induction_parts(rng: random.Random, alphabet: str, chars: tuple[int, int] = INDUCTION_SPAN) -> tuple[str, str]:
    """(span, repeat) of an induction row: a random span of ``chars`` (min, max) characters of ``alphabet`` and
    its repeat after a space. Only the repeat is a target: the span itself is unpredictable."""
    span = "".join(rng.choice(alphabet) for _ in range(rng.randint(*chars)))
    return span + " ", span


def make_task_fn(task: str, world: list[Person], passkey_chars: tuple[int, int],
                 induction_chars: tuple[int, int] = INDUCTION_SPAN) -> Callable[[random.Random], str]:
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
    if task in INDUCTION_ALPHABETS:
        return lambda rng: "".join(induction_parts(rng, INDUCTION_ALPHABETS[task], induction_chars))
    raise ValueError(f"mix: unknown task {task!r} (tasks: {', '.join(TASKS)})")


class SyntheticCorpus:
    """Random-access stream of synthetic documents: ``corpus[i]`` is document i; iterate from any index.

    With a ``tokenizer``, induction rows come as ``Document``s whose loss mask keeps only the repeat (and its
    ``</s>``); without one every document is text (the whole row a target)."""

    def __init__(self, seed: int = 0, mix: dict[str, float] | None = None, split: str = "train",
                 passkey_chars: tuple[int, int] = (200, 1000), num_people: int = 24,
                 tokenizer: Tokenizer | None = None, induction_chars: tuple[int, int] = INDUCTION_SPAN):
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
        if not 0 < induction_chars[0] <= induction_chars[1]:
            raise ValueError(f"induction_chars must satisfy 0 < min <= max, got {induction_chars}")
        self.induction_chars = tuple(induction_chars)
        self.seed, self.split = seed, split
        self.world = make_world(seed, num_people)
        self._tasks = [t for t in mix if mix[t] > 0]
        self._weights = [float(mix[t]) for t in self._tasks]
        self._fns = {t: make_task_fn(t, self.world, passkey_chars, self.induction_chars) for t in self._tasks}
        self.tokenizer = tokenizer

    def __getitem__(self, i: int) -> str | Document:
        if i < 0:
            raise IndexError(i)
        rng = random.Random(f"{self.seed}:{self.split}:{i}")
        task = rng.choices(self._tasks, self._weights)[0]
        if task in INDUCTION_ALPHABETS and self.tokenizer is not None:
            span, repeat = induction_parts(rng, INDUCTION_ALPHABETS[task], self.induction_chars)
            context = self.tokenizer.encode(span, add_bos=True)
            target = self.tokenizer.encode(repeat, add_eos=True)
            return Document(context + target, [False] * len(context) + [True] * len(target))
        return self._fns[task](rng)

    def iter_from(self, start: int) -> Iterator[str | Document]:
        i = start
        while True:
            yield self[i]
            i += 1
