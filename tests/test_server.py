"""The OpenAI-compatible server (models.server) as a real process on a free 127.0.0.1 port, through the official
``openai`` client: chat and completions, streaming, a tool call round trip, stop strings, bad requests, many clients
at once, a full queue, a client that disconnects.

The checkpoint is a micro model (byte tokenizer) written to a tmp dir in the layout train/ exports (``model/`` with
``tokenizer.json`` beside it). Its output head is fitted so that two conversations are its greedy replies: the
trunk stays random, and the head is solved in closed form (``_fit_head``) so that at every assistant position of
the two conversations, rendered by train's chat template, the logit of the next token is 20 and the others 0. A
prompt that the server renders differently from the template, by one token, gives other hidden states and so
another reply: the replies check the rendering.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from models import InternLM2Config, InternLM2ForCausalLM
from models.context import PackedContext
from models.packing import PackedInputs
from train.data.chat import CALCULATOR, IM_END, encode, encode_prompt
from train.data.tokenizer import ByteTokenizer, describe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = [{"type": "function", "function": CALCULATOR}]
ASK = {"role": "user", "content": "Use the calculator: 2 + 3"}
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_0", "type": "function",
     "function": {"name": "calculator", "arguments": json.dumps({"expression": "2 + 3"})}}]}
RESULT = {"role": "tool", "tool_call_id": "call_0", "content": json.dumps({"result": 5})}
TOOL_CHAT = [ASK, CALL, RESULT, {"role": "assistant", "content": "2 + 3 = 5"}]
HELLO = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there, friend"}]
MAX_SEQ_LEN = 512
LONG = 400


def _fit_head(model, conversations, tokenizer) -> None:
    """Output head W (V, d) with W h_i = 20 * onehot(next token) at every labelled position i (hidden states h_i of
    the random trunk; fewer positions than d, so the system is exactly solvable): W = R + (Y - R H^T)(H H^T)^-1 H,
    R the random initial head, so other contexts still get random logits."""
    hs, targets = [], []
    for messages, tools in conversations:
        ids, labels = encode(messages, tokenizer, tools=tools)
        seq = torch.tensor(ids)
        cu = torch.tensor([0, len(ids)], dtype=torch.int32)
        with torch.no_grad():
            h = model.model(seq, PackedContext(PackedInputs(seq, cu, len(ids), None, None, None), model.model.rotary))
        nxt = torch.tensor(labels[1:] + [-100])          # labels are the inputs; position i predicts label i + 1
        hs.append(h[nxt != -100])
        targets.append(nxt[nxt != -100])
    H, y = torch.cat(hs).double(), torch.cat(targets)
    assert H.shape[0] < H.shape[1]
    Y = torch.zeros(len(y), model.config.vocab_size, dtype=torch.float64)
    Y[torch.arange(len(y)), y] = 20.0
    R = model.output.weight.detach().double()
    W = R + (Y.T - R @ H.T) @ torch.linalg.solve(H @ H.T, H)
    model.output.weight.data.copy_(W.float())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = ByteTokenizer()
    cfg = dataclasses.replace(InternLM2Config.preset("micro"), vocab_size=tokenizer.vocab_size,
                              max_position_embeddings=MAX_SEQ_LEN)
    model = InternLM2ForCausalLM(cfg).eval()
    _fit_head(model, [(TOOL_CHAT, TOOLS), (HELLO, None)], tokenizer)
    root = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(root / "model", layout="llama")
    (root / "tokenizer.json").write_text(json.dumps(describe(tokenizer)))
    return str(root / "model"), model, tokenizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: str, log_path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "wb") as log:          # a file, not a pipe: a full pipe would block the server
            self.proc = subprocess.Popen([sys.executable, "-m", "models.server", "--model", model_dir, "--port",
                                          str(self.port), "--threads", "1", "--max-seq-len", str(MAX_SEQ_LEN),
                                          *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise TimeoutError(f"server on port {self.port} did not start")

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def client(self, cls=openai.OpenAI):
        return cls(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def servers(checkpoint, tmp_path_factory):
    """The main server (8 slots + 24 queued: 32 requests fit) and a small one (2 slots + 1 queued)."""
    path, logs = checkpoint[0], tmp_path_factory.mktemp("logs")
    main = Server(path, logs / "main.log", "--max-batch", "8", "--max-queue", "24")
    small = Server(path, logs / "small.log", "--max-batch", "2", "--max-queue", "1")
    try:
        main.wait()
        small.wait()
        yield main, small
        assert main.proc.poll() is None and small.proc.poll() is None, "the servers survived every test"
        assert "Traceback" not in main.log() + small.log()
    finally:
        main.close()
        small.close()


def greedy(model, tokenizer, prompt: list[int], max_new: int) -> str:
    """The reference reply: model.generate's greedy tokens, one prompt alone, without the stop token."""
    stop = (tokenizer.special_ids[IM_END], tokenizer.eos_id)
    out = model.generate([prompt], max_new_tokens=max_new, stop_token_ids=stop)[0]
    return tokenizer.decode([t for t in out if t not in stop])


def test_models_health_chat_and_streaming(checkpoint, servers):
    path, _, tokenizer = checkpoint
    main, _ = servers
    client = main.client()
    assert [m.id for m in client.models.list().data] == [path]
    r = client.chat.completions.create(model=path, messages=HELLO[:1], temperature=0)
    assert r.choices[0].message.content == "hello there, friend" and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(encode_prompt(HELLO[:1], tokenizer))
    assert r.usage.completion_tokens == len("hello there, friend") + 1          # the bytes and <|im_end|>
    chunks = list(client.chat.completions.create(model=path, messages=HELLO[:1], temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello there, friend"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5, "sent as produced"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens
    # Sampling with a seed repeats (the request draws from its own generator).
    sampled = [client.chat.completions.create(model=path, messages=HELLO[:1], temperature=1.5, seed=11,
                                              max_tokens=24, extra_body={"top_k": 50}).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    # /v1/completions on the rendered template text continues it the same way.
    text = tokenizer.decode(encode_prompt(HELLO[:1], tokenizer))
    c = client.completions.create(model=path, prompt=text, max_tokens=40, temperature=0)
    assert c.choices[0].text == "hello there, friend" and c.choices[0].finish_reason == "stop"
    assert main.health()["status"] == "ok"


def test_tool_call_round_trip(checkpoint, servers):
    path, _, tokenizer = checkpoint
    client = servers[0].client()
    r = client.chat.completions.create(model=path, messages=[ASK], tools=TOOLS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": "2 + 3"}
    assert r.usage.prompt_tokens == len(encode_prompt([ASK], tokenizer, tools=TOOLS))
    # Streamed, the call comes as one tool_calls delta and no content.
    chunks = list(client.chat.completions.create(model=path, messages=[ASK], tools=TOOLS, temperature=0, stream=True))
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)
    (streamed,) = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
    assert streamed[0].function.name == "calculator" and streamed[0].function.arguments == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The call and the tool's result go back: rendered as the template's plugin call and environment turn, the
    # fitted reply follows.
    back = [ASK, choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"result": 5})}]
    r = client.chat.completions.create(model=path, messages=back, tools=TOOLS, temperature=0)
    assert r.choices[0].message.content == "2 + 3 = 5" and r.choices[0].message.tool_calls is None
    assert r.usage.prompt_tokens == len(encode_prompt(TOOL_CHAT[:3], tokenizer, tools=TOOLS))


def test_stop_strings(checkpoint, servers):
    path = checkpoint[0]
    client = servers[0].client()
    r = client.chat.completions.create(model=path, messages=HELLO[:1], temperature=0, stop=[" there", "zzz"])
    assert r.choices[0].message.content == "hello" and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=path, messages=HELLO[:1], temperature=0, stop="ere,",
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "hello th"
    assert chunks[-1].choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=path, messages=HELLO[:1], temperature=0, max_tokens=4)
    assert r.choices[0].message.content == "hell" and r.choices[0].finish_reason == "length"


def _post(server, route: str, body) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server.url + route, content=content, headers={"content-type": "application/json"})


def test_bad_requests_get_4xx_and_the_server_keeps_serving(checkpoint, servers):
    path = checkpoint[0]
    main = servers[0]
    ok = {"model": path, "messages": HELLO[:1], "temperature": 0}
    too_long = "x" * MAX_SEQ_LEN
    bad = [  # (route, body, status, param)
        ("/v1/chat/completions", "{not json", 400, None),
        ("/v1/chat/completions", "[1, 2]", 400, None),
        ("/v1/chat/completions", {**ok, "model": "gpt-4"}, 404, "model"),
        ("/v1/chat/completions", {**ok, "model": 3}, 400, "model"),
        ("/v1/chat/completions", {**ok, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {**ok, "messages": "hi"}, 400, "messages"),
        ("/v1/chat/completions", {**ok, "messages": [{"role": "user"}]}, 400, "messages"),
        ("/v1/chat/completions", {**ok, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
        ("/v1/chat/completions", {**ok, "messages": [{"role": "user", "content": 5}]}, 400, "messages"),
        ("/v1/chat/completions", {**ok, "messages": [3]}, 400, "messages"),
        ("/v1/chat/completions", {**ok, "messages": [{"role": "user", "content": "<|im_end|>"}]}, 400, "messages"),
        ("/v1/chat/completions", {**ok, "messages": [{"role": "tool", "content": "5"}]}, 400, "messages"),
        ("/v1/chat/completions", {**ok, "messages": [{"role": "user", "content": too_long}]}, 400, "messages"),
        ("/v1/chat/completions", {**ok, "max_tokens": -1}, 400, "max_tokens"),
        ("/v1/chat/completions", {**ok, "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/chat/completions", {**ok, "max_tokens": MAX_SEQ_LEN}, 400, "max_tokens"),
        ("/v1/chat/completions", {**ok, "max_tokens": "10"}, 400, "max_tokens"),
        ("/v1/chat/completions", {**ok, "max_tokens": 1.5}, 400, "max_tokens"),
        ("/v1/chat/completions", {**ok, "temperature": "hot"}, 400, "temperature"),
        ("/v1/chat/completions", {**ok, "temperature": -0.1}, 400, "temperature"),
        ("/v1/chat/completions", {**ok, "top_p": 0}, 400, "top_p"),
        ("/v1/chat/completions", {**ok, "top_k": -5}, 400, "top_k"),
        ("/v1/chat/completions", {**ok, "seed": "x"}, 400, "seed"),
        ("/v1/chat/completions", {**ok, "n": 2}, 400, "n"),
        ("/v1/chat/completions", {**ok, "stream": "yes"}, 400, "stream"),
        ("/v1/chat/completions", {**ok, "stop": [1]}, 400, "stop"),
        ("/v1/chat/completions", {**ok, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ("/v1/chat/completions", {**ok, "tools": {"name": "f"}}, 400, "tools"),
        ("/v1/chat/completions", {**ok, "tools": [{"type": "function"}]}, 400, "messages"),
        ("/v1/completions", {"model": path, "prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"model": path, "prompt": [1, 100000]}, 400, "prompt"),
        ("/v1/completions", {"model": path, "prompt": {"a": 1}}, 400, "prompt"),
    ]
    for route, body, status, param in bad:
        r = _post(main, route, body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param, body
    assert httpx.get(main.url + "/v2/nothing").status_code == 404
    assert httpx.get(main.url + "/v1/chat/completions").status_code == 405
    client = main.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=HELLO[:1])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=path, messages=HELLO[:1], max_tokens=100_000)
    r = _post(main, "/v1/chat/completions", ok)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hello there, friend"
    assert main.health()["outstanding"] == 0


def test_32_concurrent_requests_equal_their_sequential_greedy_replies(checkpoint, servers):
    path, model, tokenizer = checkpoint
    main = servers[0]
    conversations = [[{"role": "user", "content": f"request {i}: " + "abcdefgh"[: i % 8] * (1 + i % 3)}]
                     for i in range(31)] + [HELLO[:1]]
    budgets = [6 + i % 5 for i in range(31)] + [40]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # beside two busy server processes, two OpenMP threads spin-wait on each other (10x)
    try:
        want = [greedy(model, tokenizer, encode_prompt(m, tokenizer), n) for m, n in zip(conversations, budgets)]
    finally:
        torch.set_num_threads(threads)
    client = main.client(openai.AsyncOpenAI)

    async def one(i, messages):
        kw = dict(model=path, messages=messages, temperature=0, max_tokens=budgets[i])
        if i % 2:      # half of them streamed
            stream = await client.chat.completions.create(stream=True, **kw)
            return "".join([c.choices[0].delta.content or "" async for c in stream])
        return (await client.chat.completions.create(**kw)).choices[0].message.content

    async def run_all():
        return await asyncio.gather(*(one(i, m) for i, m in enumerate(conversations)))

    got = asyncio.run(run_all())
    assert got == want
    assert want[-1] == "hello there, friend"


def test_a_full_queue_refuses_with_429_and_loses_nothing(checkpoint, servers):
    path = checkpoint[0]
    small = servers[1]                        # 2 slots + 1 queued
    client = small.client(openai.AsyncOpenAI)

    async def run():
        # The longest replies the server allows (LONG), so the three held requests are still running when the
        # fourth arrives, also on a loaded machine (with 120 tokens one could finish first, under CI's load).
        kw = dict(model=path, prompt=[1, 5, 7], max_tokens=LONG, temperature=0, extra_body={"ignore_eos": True})
        held = [asyncio.ensure_future(client.completions.create(**kw)) for _ in range(3)]
        while small.health()["outstanding"] < 3:
            await asyncio.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as refused:
            await client.completions.create(**kw)
        return await asyncio.gather(*held), refused.value

    answers, refused = asyncio.run(run())
    assert refused.status_code == 429 and refused.body["code"] == "server_busy"
    assert [a.usage.completion_tokens for a in answers] == [LONG] * 3
    assert len({a.choices[0].text for a in answers}) == 1
    assert small.health()["outstanding"] == 0


def test_a_disconnect_mid_stream_frees_its_slot_and_pages(checkpoint, servers):
    path = checkpoint[0]
    small = servers[1]
    before = small.health()
    body = {"model": path, "prompt": [1, 5, 7], "max_tokens": LONG,
            "ignore_eos": True, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", small.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert [next(lines) for _ in range(4)][0].startswith("data: {")
        assert small.health()["running"] == 1 and small.health()["free_pages"] < before["total_pages"]
    deadline = time.monotonic() + 30
    while small.health()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = small.health()
    assert after["cancelled"] == before["cancelled"] + 1 and after["finished"] == before["finished"]
    assert after["running"] == after["queued"] == 0 and after["free_pages"] == after["total_pages"]
