"""OpenAI's chat / completions wire format for models.server: request checking, prompt rendering, the text of
generated tokens (stop strings, InternLM2 tool calls) and the response / stream-chunk bodies.

Everything here is plain data in and out (no web framework, no model), so the server's handlers stay thin.

- **Errors**: a bad request raises ``APIError(status, message, param, code)``; its body is OpenAI's
  ``{"error": {"message", "type", "param", "code"}}``.
- **Chat prompt**: InternLM2's template from train.data.chat (``encode_prompt``: one implementation). OpenAI's
  ``tools`` become the ``system name=<|plugin|>`` declaration, an assistant's ``tool_calls`` its
  ``<|action_start|><|plugin|>`` call, ``role: "tool"`` the ``environment name=<|plugin|>`` turn.
- **Reply text**: ``TextStream`` turns the growing token list into text that is safe to send: it holds back a tail
  that could still become a stop string, an incomplete UTF-8 character (decoded as U+FFFD), or a tool call; a
  finished reply that holds ``<|action_start|><|plugin|>\\n{"name", "parameters"}<|action_end|>`` (and the request
  declared tools) becomes OpenAI ``tool_calls`` with the parameters as a JSON ``arguments`` string.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid

from train.data.chat import ACTION_END, ACTION_START, TOOL_NAMES, encode_prompt

PLUGIN_CALL = ACTION_START + TOOL_NAMES["plugin"]
MAX_STOP_STRINGS = 4            # as OpenAI


class APIError(Exception):
    """A request the server refuses: ``status`` (4xx) and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class GenerationRequest:
    """A checked request, ready for the engine."""
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    tools: bool                   # the reply may be a tool call (the request declared tools)
    ignore_eos: bool              # vLLM's extension: run to max_tokens (stop strings still apply)


# ---------------------------------------------------------------------------------------------------------------
# Checking


def _bad(message: str, param: str | None = None, code: str | None = None):
    raise APIError(400, message, param, code)


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        _bad(f"{key} must be a number, got {v!r}", key)
    if not low <= v <= high:
        _bad(f"{key} must be in [{low}, {high}], got {v!r}", key)
    return float(v)


def _int(body: dict, key: str, low: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        _bad(f"{key} must be an integer, got {v!r}", key)
    if low is not None and v < low:
        _bad(f"{key} must be >= {low}, got {v}", key)
    return v


def _bool(body: dict, key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        _bad(f"{key} must be a boolean, got {v!r}", key)
    return v


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        _bad("model must be a non-empty string", "model")
    if model != served:
        raise APIError(404, f"The model {model!r} does not exist (this server serves {served!r})", "model",
                       "model_not_found")


def _sampling_and_limits(body: dict, prompt: list[int], max_seq_len: int, tools: bool) -> GenerationRequest:
    if len(prompt) >= max_seq_len:
        _bad(f"This model's maximum context length is {max_seq_len} tokens; the prompt has {len(prompt)} (at least "
             "one token must be left for the reply)", "messages", "context_length_exceeded")
    n = _int(body, "n", 1)
    if n not in (None, 1):
        _bad("only n=1 is supported", "n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, 1)
    room = max_seq_len - len(prompt)
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        _bad(f"This model's maximum context length is {max_seq_len} tokens; the prompt has {len(prompt)} and "
             f"{key}={max_tokens} asks for more than the {room} left", key, "context_length_exceeded")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        _bad("top_p must be > 0", "top_p")
    top_k = _int(body, "top_k", -1)
    top_k = 0 if top_k is None or top_k == -1 else top_k      # -1 (vLLM's spelling) and 0: off
    if temperature == 0.0:             # greedy: the nucleus and top-k change nothing
        top_p, top_k = 1.0, 0
    seed = _int(body, "seed")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stop)):
        _bad(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them", "stop")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        _bad("stream_options must be an object", "stream_options")
    include_usage = _bool(options or {}, "include_usage")
    ignore_eos = _bool(body, "ignore_eos")
    if _bool(body, "logprobs") or body.get("echo"):
        _bad("logprobs and echo are not supported by this server", "logprobs")
    return GenerationRequest(prompt, max_tokens, temperature, top_p, top_k, seed, stop, stream, include_usage, tools,
                             ignore_eos)


def _content_text(content, where: str):
    """OpenAI's content: a string, or a list of {"type": "text", "text"} parts (joined)."""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                _bad(f"{where}: only text content parts are supported", "messages")
            texts.append(part["text"])
        return "".join(texts)
    return content


def chat_request(body: dict, tokenizer, max_seq_len: int) -> GenerationRequest:
    """Check a /v1/chat/completions body and render its prompt with InternLM2's chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        _bad("messages must be a non-empty list", "messages")
    converted = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            _bad(f"messages[{i}] must be an object", "messages")
        m = dict(m)
        m.pop("tool_call_id", None)                      # InternLM2 answers the one call of the turn before
        if m.get("role") == "developer":                 # OpenAI's newer name for the system prompt
            m["role"] = "system"
        if m.get("role") == "tool":
            m.pop("name", None)                          # the function's name; the environment turn is the plugin's
        if "content" in m:
            m["content"] = _content_text(m["content"], f"messages[{i}]")
        converted.append(m)
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        _bad("tool_choice must be 'auto' or 'none' (InternLM2 decides itself whether to call a tool)", "tool_choice")
    if tools is not None and not isinstance(tools, list):
        _bad("tools must be a list", "tools")
    if choice == "none":
        tools = None
    try:
        prompt = encode_prompt(converted, tokenizer, tools=tools or None)
    except ValueError as e:
        _bad(str(e), "messages")
    return _sampling_and_limits(body, prompt, max_seq_len, bool(tools))


def completion_request(body: dict, tokenizer, max_seq_len: int) -> GenerationRequest:
    """Check a /v1/completions body: ``prompt`` is a string (``<s>`` is prepended unless it starts with it), a
    list of one string, or a list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            _bad("prompt must not be empty", "prompt")
        ids = tokenizer.encode(prompt, add_bos=not prompt.startswith("<s>"))
    elif (isinstance(prompt, list) and prompt
          and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tokenizer.vocab_size for t in prompt)):
        ids = list(prompt)
    else:
        _bad(f"prompt must be a non-empty string or a list of token ids in [0, {tokenizer.vocab_size})", "prompt")
    return _sampling_and_limits(body, ids, max_seq_len, False)


# ---------------------------------------------------------------------------------------------------------------
# Reply text


class TextStream:
    """The text of a reply as its tokens arrive. ``add(tokens)`` returns the new text that can be sent now;
    ``stopped`` turns True when a stop string appeared (the text ends before it; the caller ends the request).
    ``final()`` returns (the rest of the content, tool_calls or None)."""

    def __init__(self, tokenizer, stop_ids, stop: list[str], tools: bool):
        self.tokenizer, self.stop_ids, self.stop, self.tools = tokenizer, set(stop_ids), stop, tools
        self.ids: list[int] = []
        self.text = ""           # the reply so far, cut at a stop string
        self.sent = 0            # characters of text already returned
        self.stopped = False
        self.produced = 0        # tokens generated (the reply's usage), stop token included

    def add(self, tokens: list[int]) -> str:
        if self.stopped:
            return ""
        self.produced += len(tokens)
        self.ids += [t for t in tokens if t not in self.stop_ids]   # a stop token ends the reply, unseen
        self.text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        if self.stopped:
            return self._flush(self.text)
        return self._flush(self.text[:len(self.text) - self._held_back()])

    def _held_back(self) -> int:
        """Characters at the end of text that may still change: an incomplete UTF-8 character, the start of a
        stop string, or (with tools) a tool call or the start of one."""
        text = self.text
        if self.tools and PLUGIN_CALL in text:
            return len(text) - text.index(PLUGIN_CALL)
        hold = 1 if text.endswith("\ufffd") else 0
        markers = self.stop + ([PLUGIN_CALL] if self.tools else [])
        for s in markers:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return hold

    def _flush(self, upto: str) -> str:
        new = upto[self.sent:]
        self.sent = max(self.sent, len(upto))
        return new

    def result(self) -> tuple[str, list[dict] | None]:
        """The whole reply: its content, and the tool call when it is one (the text before the call is content)."""
        calls = parse_tool_call(self.text) if self.tools else None
        return (self.text if calls is None else self.text[:self.text.index(PLUGIN_CALL)]), calls

    def final(self) -> tuple[str, list[dict] | None]:
        """The content not sent yet, and the tool call when the reply is one."""
        content, calls = self.result()
        return self._flush(content), calls


def parse_tool_call(text: str) -> list[dict] | None:
    """``...<|action_start|><|plugin|>\\n{"name": n, "parameters": {...}}<|action_end|>`` -> OpenAI tool_calls;
    None when the text holds no well-formed plugin call (it is then returned as text)."""
    at = text.find(PLUGIN_CALL)
    if at < 0:
        return None
    body = text[at + len(PLUGIN_CALL):]
    body = body[:body.index(ACTION_END)] if ACTION_END in body else body
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    params = call.get("parameters", call.get("arguments", {}))
    if not isinstance(params, dict):
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(params, ensure_ascii=False)}}]


# ---------------------------------------------------------------------------------------------------------------
# Bodies


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Reply:
    """Ids and the shared fields of one reply's bodies."""

    def __init__(self, model: str, chat: bool):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def complete(self, content: str, calls: list[dict] | None, finish_reason: str, usage_: dict) -> dict:
        if not self.chat:
            return {**self._head("text_completion"),
                    "choices": [{"index": 0, "text": content, "logprobs": None, "finish_reason": finish_reason}],
                    "usage": usage_}
        message = {"role": "assistant", "content": content if not calls else (content or None)}
        if calls:
            message["tool_calls"] = calls
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
                "usage": usage_}

    def chunk(self, delta: dict | str | None = None, finish_reason: str | None = None) -> dict:
        """A stream chunk: ``delta`` is the chat delta object (or the completion's text)."""
        if not self.chat:
            return {**self._head("text_completion"),
                    "choices": [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish_reason}]}
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]}

    def usage_chunk(self, usage_: dict) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": usage_}


def finish_reason(engine_reason: str, text: TextStream, calls: list[dict] | None) -> str:
    """OpenAI's finish_reason: tool_calls, stop (stop token or string) or length."""
    if calls:
        return "tool_calls"
    return "stop" if text.stopped or engine_reason == "stop" else "length"
