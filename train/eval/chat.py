"""Chat evaluation after SFT: exact match on verifiable conversations, and tool-call format validity.

Exact match: for each held-out conversation the model is given everything before its last assistant turn
(``render(..., add_generation_prompt=True)``), generates greedily until ``<|im_end|>``, and is right when the
reply equals the reference reply exactly. Reported per task (the synthetic set's task names; "jsonl" for files).

Tool-call validity: for each held-out conversation whose first assistant turn is a plugin call, the model is given
everything before that turn; its reply is a valid call when it is ``[text]<|action_start|><|plugin|>\\n{json}
<|action_end|>`` with a JSON object ``{"name": <a declared tool>, "parameters": {<the tool's required keys>...}}``.
``call_exact`` also counts replies equal to the reference call.
"""
from __future__ import annotations

import json
import re
from typing import Sequence

import torch

from train.data.chat import ACTION_END, ACTION_START, IM_END, TOOL_NAMES, Conversation, Message, encode_prompt
from train.data.tokenizer import Tokenizer

_CALL = re.compile(re.escape(ACTION_START + TOOL_NAMES["plugin"]) + r"\n(.*)" + re.escape(ACTION_END) + r"\Z", re.S)


def declared_tools(messages: Sequence[Message]) -> dict[str, dict]:
    tools = {}
    for m in messages:
        if m.role == "system" and m.name == "plugin":
            try:
                for fn in json.loads(m.content):
                    tools[fn["name"]] = fn
            except (json.JSONDecodeError, TypeError, KeyError):
                continue
    return tools


def valid_plugin_call(reply: str, tools: dict[str, dict]) -> bool:
    """Is ``reply`` an assistant turn ending with a well-formed call of a declared tool (module docstring)?"""
    m = _CALL.search(reply)
    if m is None:
        return False
    try:
        call = json.loads(m.group(1))
    except json.JSONDecodeError:
        return False
    if not isinstance(call, dict) or set(call) != {"name", "parameters"} or call["name"] not in tools:
        return False
    params = call["parameters"]
    required = tools[call["name"]].get("parameters", {}).get("required", [])
    return isinstance(params, dict) and all(k in params for k in required)


@torch.no_grad()
def generate_replies(model, tokenizer: Tokenizer, prompts: Sequence[Sequence[Message]], max_new_tokens: int,
                     batch: int = 16) -> list[str]:
    """Greedy replies to each conversation prefix, without the closing ``<|im_end|>``."""
    model = getattr(model, "module", model)
    end_id = tokenizer.special_ids[IM_END]
    out: list[str] = []
    for start in range(0, len(prompts), batch):
        ids = [encode_prompt(list(p), tokenizer) for p in prompts[start:start + batch]]
        for gen in model.generate(ids, max_new_tokens=max_new_tokens, temperature=0.0,
                                  stop_token_ids=(end_id, tokenizer.eos_id)):
            if gen and gen[-1] in (end_id, tokenizer.eos_id):
                gen = gen[:-1]
            out.append(tokenizer.decode(gen))
    return out


def chat_eval(model, tokenizer: Tokenizer, conversations: Sequence[Conversation], max_new_tokens: int = 64) -> dict:
    """{"exact_match": overall, "by_task": {task: (correct, total)}, "tool_call_valid": rate or None,
    "tool_call_exact": rate or None, "examples": [(prompt text, reply, reference)] (a few, tool calls first)}."""
    if not conversations:
        raise ValueError("chat_eval: no held-out conversations")
    last = [max(i for i, m in enumerate(c.messages) if m.role == "assistant") for c in conversations]
    replies = generate_replies(model, tokenizer, [c.messages[:i] for c, i in zip(conversations, last)],
                               max_new_tokens)
    by_task: dict[str, list[int]] = {}
    examples = []
    for c, i, reply in zip(conversations, last, replies):
        ref = c.messages[i].content
        stats = by_task.setdefault(c.task or "jsonl", [0, 0])
        stats[0] += int(reply == ref)
        stats[1] += 1
    calls = [(c, i) for c in conversations for i, m in enumerate(c.messages)
             if m.role == "assistant" and m.call_kind == "plugin" and all(x.role != "assistant" for x in c.messages[:i])]
    result = {"exact_match": sum(s[0] for s in by_task.values()) / len(conversations),
              "by_task": {t: tuple(s) for t, s in sorted(by_task.items())},
              "tool_call_valid": None, "tool_call_exact": None, "examples": examples}
    if calls:
        call_replies = generate_replies(model, tokenizer, [c.messages[:i] for c, i in calls], max_new_tokens)
        valid = [valid_plugin_call(r, declared_tools(c.messages[:i])) for (c, i), r in zip(calls, call_replies)]
        exact = [r == c.messages[i].content for (c, i), r in zip(calls, call_replies)]
        result["tool_call_valid"] = sum(valid) / len(calls)
        result["tool_call_exact"] = sum(exact) / len(calls)
        c, i = calls[0]
        examples.append({"prompt": c.messages[:i], "reply": call_replies[0], "reference": c.messages[i].content})
    for c, i, reply in list(zip(conversations, last, replies))[:2]:
        examples.append({"prompt": c.messages[:i], "reply": reply, "reference": c.messages[i].content})
    return result
