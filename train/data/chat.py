"""InternLM2-chat's conversation format: rendering, tokenization with assistant-only labels, and jsonl loading.

The text of a conversation (InternLM2-chat's template, as in InternLM's chat-format document):

    <s><|im_start|>system\\n{content}<|im_end|>\\n                         a system prompt
    <|im_start|>system name=<|plugin|>\\n{json tool list}<|im_end|>\\n     tool declarations (name=<|interpreter|>:
                                                                         the code interpreter's description)
    <|im_start|>user\\n{content}<|im_end|>\\n                              (user name={name} when the message names one)
    <|im_start|>assistant\\n{text}<|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|><|im_end|>\\n
    <|im_start|>environment name=<|plugin|>\\n{tool result}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n                                                only with add_generation_prompt=True

A code-interpreter call is ``<|action_start|><|interpreter|>\\n{code}<|action_end|>`` at the end of an assistant
turn, answered by ``environment name=<|interpreter|>``. One call per assistant turn (InternLM2 streams one action,
then waits for the environment).

Messages come in two spellings, both accepted everywhere:
- InternLM2's own: ``{"role": "system"|"user"|"assistant"|"environment", "content": str, "name"?: str}``; an
  assistant's call is already in its content (``...<|action_start|><|plugin|>\\n{json}<|action_end|>``); the name of
  a system or environment message is ``"plugin"`` or ``"interpreter"``.
- OpenAI's: a record's ``"tools": [{"type": "function", "function": {...}}]`` becomes the plugin declaration
  (inserted after the leading system prompts); an assistant's ``"tool_calls": [{"type": "function", "function":
  {"name", "arguments"}}]`` becomes the plugin call (``arguments`` as a JSON string or object) and
  ``{"type": "code_interpreter", "code_interpreter": {"input": code}}`` the interpreter call; ``role: "tool"`` is
  ``environment name=<|plugin|>``.

Labels (``encode``): the content of every assistant turn, its call included, and its closing ``<|im_end|>`` carry
labels; ``<s>``, every header (``<|im_start|>assistant\\n`` too), the newline after ``<|im_end|>``, and all system,
user and environment turns are ``-100``. Each part is tokenized on its own, so for the byte tokenizer ``input_ids``
equals ``tokenizer.encode(render(messages))``; a SentencePiece tokenizer may merge differently across a
header/content boundary (the usual SFT practice, and what the labels need).
"""
from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

from models.packing import IGNORE_INDEX
from train.data.packing import jsonl_records
from train.data.tokenizer import BOS, Tokenizer

ROLES = ("system", "user", "assistant", "environment")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ACTION_START, ACTION_END = "<|action_start|>", "<|action_end|>"
TOOL_NAMES = {"plugin": "<|plugin|>", "interpreter": "<|interpreter|>"}   # system/environment name -> its token
# Strings that would end or open a turn from inside a message: never allowed in content (prompt injection).
_STRUCTURE_TOKENS = (IM_START, IM_END, BOS)


@dataclass(frozen=True)
class Message:
    """One turn in InternLM2's own form; ``name`` is "plugin"/"interpreter" (system, environment), any label (user)
    or None. An assistant's tool call is part of its ``content``."""
    role: str
    content: str
    name: str | None = None

    @property
    def header(self) -> str:
        if self.name is None:
            return f"{IM_START}{self.role}\n"
        return f"{IM_START}{self.role} name={TOOL_NAMES.get(self.name, self.name)}\n"

    @property
    def call_kind(self) -> str | None:
        """"plugin" / "interpreter" when this assistant turn ends with a tool call."""
        if self.role != "assistant":
            return None
        for kind, token in TOOL_NAMES.items():
            if f"{ACTION_START}{token}" in self.content:
                return kind
        return None


def plugin_call(name: str, parameters: dict) -> str:
    """The text of a plugin call (appended to an assistant turn's content)."""
    body = json.dumps({"name": name, "parameters": parameters}, ensure_ascii=False)
    return f"{ACTION_START}{TOOL_NAMES['plugin']}\n{body}{ACTION_END}"


def interpreter_call(code: str) -> str:
    return f"{ACTION_START}{TOOL_NAMES['interpreter']}\n{code}{ACTION_END}"


def plugin_declaration(functions: Sequence[dict]) -> Message:
    """The ``system name=<|plugin|>`` turn declaring ``functions`` (each {"name", "description", "parameters"})."""
    return Message("system", json.dumps(list(functions), ensure_ascii=False), "plugin")


# ---------------------------------------------------------------------------------------------------------------
# Validation and normalization


def _fail(where: str, message: str):
    raise ValueError(f"{where}: {message}")


def _openai_call(call, where: str) -> str:
    if not isinstance(call, dict):
        _fail(where, f"a tool call must be an object, got {type(call).__name__}")
    kind = call.get("type", "function")
    if kind == "function":
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            _fail(where, "a function tool call needs function.name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                _fail(where, f"function.arguments of {fn['name']!r} is not valid JSON ({e.msg})")
        if not isinstance(args, dict):
            _fail(where, f"function.arguments of {fn['name']!r} must be a JSON object")
        return plugin_call(fn["name"], args)
    if kind == "code_interpreter":
        code = (call.get("code_interpreter") or {}).get("input")
        if not isinstance(code, str):
            _fail(where, "a code_interpreter tool call needs code_interpreter.input (a string)")
        return interpreter_call(code)
    _fail(where, f"unknown tool call type {kind!r} (function, code_interpreter)")


def _one_message(m, where: str) -> Message:
    if not isinstance(m, dict):
        _fail(where, f"a message must be an object, got {type(m).__name__}")
    role = m.get("role")
    if role == "tool":   # OpenAI's tool result
        role, name = "environment", "plugin"
    else:
        name = m.get("name")
    if role not in ROLES:
        _fail(where, f"unknown role {role!r} (roles: {', '.join(ROLES)}, or OpenAI's 'tool')")
    content = m.get("content")
    if content is None and m.get("tool_calls"):
        content = ""
    if not isinstance(content, str):
        _fail(where, f"content must be a string, got {type(content).__name__}")
    for token in _STRUCTURE_TOKENS:
        if token in content:
            _fail(where, f"content contains {token!r}, which would break the turn structure")
    if name is not None:
        if not isinstance(name, str) or not name:
            _fail(where, f"name must be a non-empty string, got {name!r}")
        if role in ("system", "environment") and name not in TOOL_NAMES:
            _fail(where, f"a {role} message's name must be one of {', '.join(TOOL_NAMES)}, got {name!r}")
        if role == "assistant":
            _fail(where, "an assistant message takes no name (its tool calls go in content or tool_calls)")
    calls = m.get("tool_calls")
    if calls:
        if role != "assistant":
            _fail(where, f"tool_calls on a {role} message")
        if not isinstance(calls, list) or len(calls) != 1:
            _fail(where, "InternLM2 makes one tool call per assistant turn; tool_calls must hold exactly one")
        if ACTION_START in content:
            _fail(where, "a message has both tool_calls and a call in its content")
        content += _openai_call(calls[0], where)
    return Message(role, content, name)


def normalize(messages, tools=None, where: str = "messages", require_assistant: bool = False) -> list[Message]:
    """Check a conversation and bring it to InternLM2's form (see the module docstring). Raises ValueError naming
    ``where`` (e.g. ``"data.jsonl:12"``) and the message: unknown role, wrong types, no assistant turn (with
    ``require_assistant``), a tool result that answers no call, a call whose kind has no declaration."""
    if isinstance(messages, tuple):
        messages = list(messages)
    if not isinstance(messages, list) or not messages:
        _fail(where, "messages must be a non-empty list")
    out = [m if isinstance(m, Message) else _one_message(m, f"{where}: message {i}") for i, m in enumerate(messages)]
    if tools:
        if not isinstance(tools, list):
            _fail(where, "tools must be a list")
        functions = []
        for t in tools:
            fn = t.get("function", t) if isinstance(t, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                _fail(where, "each tool must be {'type': 'function', 'function': {'name': ...}} or a function object")
            functions.append(fn)
        at = 0
        while at < len(out) and out[at].role == "system" and out[at].name is None:
            at += 1
        out.insert(at, plugin_declaration(functions))
    declared = set()
    for i, m in enumerate(out):
        if m.role == "system" and m.name:
            declared.add(m.name)
        kind = m.call_kind
        if kind and kind not in declared:
            _fail(f"{where}: message {i}", f"an assistant turn calls a {kind} tool, but no "
                  f"system name={TOOL_NAMES[kind]} message declares one before it")
        if m.role == "environment":
            prev = out[i - 1] if i else None
            if prev is None or prev.call_kind is None:
                _fail(f"{where}: message {i}", "an environment (tool) result answers no call: the turn before it "
                      "must be an assistant turn that calls a tool")
            if m.name is not None and m.name != prev.call_kind:
                _fail(f"{where}: message {i}", f"an environment name={m.name} result answers the {prev.call_kind} call before it")
    if require_assistant and not any(m.role == "assistant" for m in out):
        _fail(where, "no assistant turn (nothing to learn from)")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Rendering and tokenization


def render(messages, add_generation_prompt: bool = False, tools=None) -> str:
    """The conversation as InternLM2-chat's template text (module docstring)."""
    parts = [BOS]
    for m in normalize(messages, tools):
        parts.append(f"{m.header}{m.content}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def encode(messages, tokenizer: Tokenizer, tools=None, where: str = "messages") -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a training conversation: labels equal input_ids on assistant content and its
    ``<|im_end|>``, -100 elsewhere (HF convention; the model shifts them)."""
    msgs = normalize(messages, tools, where, require_assistant=True)
    end = tokenizer.encode(IM_END)
    newline = tokenizer.encode("\n")
    ids = [tokenizer.bos_id]
    labels = [IGNORE_INDEX]
    for m in msgs:
        header = tokenizer.encode(m.header)
        body = tokenizer.encode(m.content) + end
        ids += header + body + newline
        learn = m.role == "assistant"
        labels += [IGNORE_INDEX] * len(header) + (body if learn else [IGNORE_INDEX] * len(body))
        labels += [IGNORE_INDEX] * len(newline)
    return ids, labels


def encode_prompt(messages, tokenizer: Tokenizer, tools=None) -> list[int]:
    """Token ids of ``messages`` followed by ``<|im_start|>assistant\\n``: the prompt for the next reply."""
    return tokenizer.encode(render(messages, add_generation_prompt=True, tools=tools))


# ---------------------------------------------------------------------------------------------------------------
# Data: OpenAI-style jsonl, and the embedded synthetic set


@dataclass(frozen=True)
class Conversation:
    messages: list[Message]
    task: str = ""           # synthetic: the task that made it (evaluation groups by it)
    answer: str = ""         # synthetic: the exact final assistant reply


def read_conversations(path: str) -> list[Conversation]:
    """A jsonl file with one ``{"messages": [...], "tools"?: [...]}`` per line (blank lines skipped); each record
    is validated, errors name ``path:line``."""
    out = []
    for where, record in jsonl_records(path):
        if not isinstance(record, dict) or "messages" not in record:
            raise ValueError(f"{where}: a record must be an object with a 'messages' list")
        msgs = normalize(record["messages"], record.get("tools"), where, require_assistant=True)
        out.append(Conversation(msgs))
    if not out:
        raise ValueError(f"{path}: no conversations")
    return out


# Tools of the synthetic set, declared in OpenAI's function form.
CALCULATOR = {"name": "calculator", "description": "Evaluate an arithmetic expression with + - * and integers.",
              "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                             "required": ["expression"]}}
LOOKUP = {"name": "lookup", "description": "Look up a fact about a person: field is city, job, pet or colour.",
          "parameters": {"type": "object", "properties": {"person": {"type": "string"}, "field": {"type": "string"}},
                         "required": ["person", "field"]}}
SYNTHETIC_CHAT_TASKS = ("arithmetic", "calculator", "lookup", "multiturn", "system", "echo", "recall")
_FIELDS = {"city": "lives in {}", "job": "works as a {}", "pet": "has a {}", "colour": "likes the colour {}"}
_VALUES = {"city": ("Vesk", "Ormel", "Tandra", "Quillon", "Baseth", "Korvi", "Lunmar", "Pellica", "Ystra", "Dovrin"),
           "job": ("baker", "potter", "pilot", "gardener", "tailor", "doctor", "painter", "sailor", "miner", "teacher"),
           "pet": ("cat", "dog", "parrot", "goat", "rabbit", "turtle", "owl", "horse"),
           "colour": ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")}
HELDOUT_NAME_EVERY = 4   # one name in four is an evaluation name (``_name``)
_SYLLABLES = ("ka", "lo", "mi", "ra", "to", "ve", "zu", "ne", "shi", "da", "por", "fen", "gal", "mur", "tes", "bri")


def _word(rng: random.Random, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(lo, hi)))


def _name(rng: random.Random, heldout: bool) -> str:
    """A fresh two-part name drawn per conversation: the model must copy it, it cannot have memorized it. One name
    in four (by a hash of its text) is reserved for evaluation: training splits never draw those, every other split
    draws only those, so a held-out name was never seen in training."""
    while True:
        parts = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize() for _ in range(2)]
        name = " ".join(parts)
        if (zlib.crc32(name.encode()) % HELDOUT_NAME_EVERY == 0) == heldout:
            return name


def _expression(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(10, 999), rng.randint(2, 99)
    op = rng.choice("+-*")
    return f"{a} {op} {b}", (a + b if op == "+" else a - b if op == "-" else a * b)


class SyntheticChats:
    """Random-access synthetic conversations with verifiable answers: ``chats[i]`` is a pure function of
    (seed, split, i). Tasks (issue 21: each one a small model can learn once it copies from its context; names,
    words and numbers are drawn per conversation, so a held-out conversation is new): ``echo`` (repeat 1-3 words),
    ``system`` (a system prompt that asks for upper case, or not, then repeat a word), ``multiturn`` (repeat a word,
    then the same in upper case), ``recall`` (2-3 facts "{name} lives in {place}." then "Where does {name} live?"),
    ``lookup`` and ``calculator`` (a tool call whose arguments are copied from the question, the environment's
    result, then an answer copied from both), ``arithmetic`` (a sum of two digits: a 100-entry table)."""

    def __init__(self, seed: int = 0, split: str = "train", tasks: Sequence[str] = SYNTHETIC_CHAT_TASKS):
        for t in tasks:
            if t not in SYNTHETIC_CHAT_TASKS:
                raise ValueError(f"tasks: unknown synthetic chat task {t!r} ({', '.join(SYNTHETIC_CHAT_TASKS)})")
        if not tasks:
            raise ValueError("tasks: need at least one synthetic chat task")
        self.seed, self.split, self.tasks = seed, split, tuple(tasks)
        self.heldout_names = not split.endswith("train")   # train, pref-train, ppo_train: training names

    def __getitem__(self, i: int) -> Conversation:
        if i < 0:
            raise IndexError(i)
        rng = random.Random(f"chat:{self.seed}:{self.split}:{i}")
        task = rng.choice(self.tasks)
        return getattr(self, f"_{task}")(rng)

    def iter_from(self, start: int) -> Iterator[Conversation]:
        i = start
        while True:
            yield self[i]
            i += 1

    @staticmethod
    def _arithmetic(rng: random.Random) -> Conversation:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        answer = str(a + b)
        return Conversation([Message("user", f"What is {a} + {b}?"), Message("assistant", answer)], "arithmetic",
                            answer)

    @staticmethod
    def _calculator(rng: random.Random) -> Conversation:
        expr, value = _expression(rng)
        answer = f"{expr} = {value}"
        msgs = [plugin_declaration([CALCULATOR]), Message("user", f"Use the calculator: {expr}"),
                Message("assistant", plugin_call("calculator", {"expression": expr})),
                Message("environment", json.dumps({"result": value}), "plugin"), Message("assistant", answer)]
        return Conversation(msgs, "calculator", answer)

    def _lookup(self, rng: random.Random) -> Conversation:
        name = _name(rng, self.heldout_names)
        field = rng.choice(tuple(_FIELDS))
        value = rng.choice(_VALUES[field])
        answer = f"{name} {_FIELDS[field].format(value)}."
        msgs = [plugin_declaration([LOOKUP]), Message("user", f"What is the {field} of {name}?"),
                Message("assistant", plugin_call("lookup", {"person": name, "field": field})),
                Message("environment", json.dumps({field: value}), "plugin"), Message("assistant", answer)]
        return Conversation(msgs, "lookup", answer)

    @staticmethod
    def _multiturn(rng: random.Random) -> Conversation:
        w = _word(rng)
        msgs = [Message("user", f"repeat: {w}"), Message("assistant", w),
                Message("user", "now in upper case"), Message("assistant", w.upper())]
        return Conversation(msgs, "multiturn", w.upper())

    @staticmethod
    def _system(rng: random.Random) -> Conversation:
        w = _word(rng)
        upper = rng.random() < 0.5
        answer = w.upper() if upper else w
        system = "Answer in upper case." if upper else "You are a helpful assistant."
        msgs = [Message("system", system), Message("user", f"repeat: {w}"), Message("assistant", answer)]
        return Conversation(msgs, "system", answer)

    @staticmethod
    def _echo(rng: random.Random) -> Conversation:
        phrase = " ".join(_word(rng) for _ in range(rng.randint(1, 3)))
        return Conversation([Message("user", f"repeat: {phrase}"), Message("assistant", phrase)], "echo", phrase)

    def _recall(self, rng: random.Random) -> Conversation:
        people: list[tuple[str, str]] = []
        count = rng.randint(2, 3)
        while len(people) < count:
            name = _name(rng, self.heldout_names)
            if name not in (p for p, _ in people):
                people.append((name, _word(rng, 4, 7).capitalize()))
        who, where = rng.choice(people)
        facts = " ".join(f"{n} lives in {c}." for n, c in people)
        return Conversation([Message("user", f"{facts} Where does {who} live?"), Message("assistant", where)],
                            "recall", where)
