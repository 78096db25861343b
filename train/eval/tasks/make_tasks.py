"""Write the shipped tasks' jsonl files deterministically from the training data generators (a fixed seed and
splits of their own, ``lm_eval`` / ``lm_eval_choice``, never drawn for training):

    python -m train.eval.tasks.make_tasks        # rewrites train/eval/tasks/*.jsonl (committed)

- ``chat.jsonl``       synthetic chat (train.data.chat.SyntheticChats): the conversation up to its final
                       assistant turn, rendered with the InternLM2 chat template, and the exact final reply.
- ``tool.jsonl``       the first assistant turn of the tool-using conversations (calculator, lookup): the plugin
                       call, with special tokens removed from the target (lm-eval decodes generations with
                       skip_special_tokens, as its ``hf`` model does), i.e. "\\n{json}".
- ``arithmetic.jsonl`` "a op b =" -> " result", the pretraining corpus's arithmetic format.
- ``choice.jsonl``     multiple choice over the corpus's world of facts (train.data.corpus.make_world): "Q: Where
                       does X live? A:" with every city (job, pet, colour) as a choice.
- ``heldout.jsonl``    documents of the pretraining mix (no passkey) for rolling perplexity.
"""
from __future__ import annotations

import json
import os
import random

from train.data.chat import IM_END, SyntheticChats, render
from train.data.corpus import SyntheticCorpus, make_world

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0                      # the demo's seed: the same world of people as its checkpoints
SIZES = {"chat": 100, "tool": 60, "arithmetic": 100, "choice": 100, "heldout": 40}
_SPECIALS = ("<|action_start|>", "<|action_end|>", "<|plugin|>", "<|interpreter|>", IM_END, "<|im_start|>")


def _strip_specials(text: str) -> str:
    for s in _SPECIALS:
        text = text.replace(s, "")
    return text


def chat_records(n: int) -> list[dict]:
    chats = SyntheticChats(SEED, "lm_eval")
    out = []
    for i in range(n):
        c = chats[i]
        last = max(j for j, m in enumerate(c.messages) if m.role == "assistant")
        out.append({"task": c.task, "prompt": render(c.messages[:last], add_generation_prompt=True),
                    "answer": c.messages[last].content})
    return out


def tool_records(n: int) -> list[dict]:
    chats = SyntheticChats(SEED, "lm_eval", tasks=("calculator", "lookup"))
    out = []
    for i in range(n):
        c = chats[i]
        first = next(j for j, m in enumerate(c.messages) if m.role == "assistant")
        out.append({"task": c.task, "prompt": render(c.messages[:first], add_generation_prompt=True),
                    "answer": _strip_specials(c.messages[first].content)})
    return out


def arithmetic_records(n: int) -> list[dict]:
    rng = random.Random(f"lm_eval:arithmetic:{SEED}")
    out = []
    for _ in range(n):
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            value = a * b
        else:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            if op == "-" and b > a:
                a, b = b, a
            value = a + b if op == "+" else a - b
        out.append({"prompt": f"{a} {op} {b} =", "answer": f" {value}"})
    return out


def choice_records(n: int) -> list[dict]:
    world = make_world(SEED)
    rng = random.Random(f"lm_eval:choice:{SEED}")
    fields = {"city": ("Where does {} live?", lambda p: p.city, sorted({p.city for p in world})),
              "job": ("What does {} work as?", lambda p: f"a {p.job}", sorted({f"a {p.job}" for p in world})),
              "pet": ("What pet does {} have?", lambda p: f"a {p.pet}", sorted({f"a {p.pet}" for p in world})),
              "color": ("What is the favourite colour of {}?", lambda p: p.color, sorted({p.color for p in world}))}
    out = []
    for _ in range(n):
        person = rng.choice(world)
        question, value, options = fields[rng.choice(tuple(fields))]
        choices = rng.sample([o for o in options if o != value(person)], min(3, len(options) - 1)) + [value(person)]
        rng.shuffle(choices)
        out.append({"query": f"Q: {question.format(person.name)} A:", "choices": [f" {c}." for c in choices],
                    "gold": choices.index(value(person))})
    return out


def heldout_records(n: int) -> list[dict]:
    corpus = SyntheticCorpus(seed=SEED, mix={"facts": 1.0, "arithmetic": 1.0, "copy": 0.4, "reverse": 0.4, "sort": 0.4},
                             split="lm_eval")
    return [{"text": corpus[i]} for i in range(n)]


def main() -> None:
    makers = {"chat": chat_records, "tool": tool_records, "arithmetic": arithmetic_records, "choice": choice_records,
              "heldout": heldout_records}
    for name, make in makers.items():
        path = os.path.join(HERE, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for record in make(SIZES[name]):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"{path}: {SIZES[name]} records")


if __name__ == "__main__":
    main()
