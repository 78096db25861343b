"""An OpenAI-compatible chat server on the continuous-batching generator.

    python -m models.server --model DIR [--host 127.0.0.1] [--port 8000] [--max-batch N] [--max-seq-len N]
                            [--max-queue N] [--tokenizer SPEC] [--backend engine|transformers]

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream``:
server-sent events in OpenAI's chunk format, then ``data: [DONE]``), ``GET /health`` (engine counters: running,
queued, free pages, cancelled). Wire format and checks: models.openai_api. Web stack: Starlette on uvicorn
(docs/serving.md says why).

**One engine**: every request goes to one ``Engine`` thread that owns the ``ContinuousBatchingGenerator`` and is the
only thread that touches it or the model. Handlers (on the asyncio loop) hand it ``submit`` / ``cancel`` commands
through a thread-safe queue; between two ``step`` calls the thread applies the commands, so requests join and leave
the batch at token boundaries. What a step produced goes back to each handler's ``asyncio.Queue`` through
``loop.call_soon_threadsafe``; a streaming handler sends each token's text as it arrives. A client that goes away
(disconnect, or a stop string matched) is cancelled: its slot and pages return before the next step.

**Admission**: ``max_batch`` requests run; up to ``max_queue`` more wait in the generator's FIFO; beyond that a
request gets ``429``. Sampling is per request (``models.serving.Sampling``): a request with a ``seed`` draws from its
own generator, so its tokens do not depend on its neighbours; greedy rows are an argmax of their own logits.

``--backend transformers`` serves the same API from ``transformers``' ``generate``, one request at a time (the peer of
benchmarks/bench_server.py).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import tempfile
import threading
import traceback

import torch

from .openai_api import (
    APIError,
    GenerationRequest,
    Reply,
    TextStream,
    chat_request,
    check_model,
    completion_request,
    finish_reason,
    usage,
)

# ---------------------------------------------------------------------------------------------------------------
# Loading


def resolve_tokenizer(model_dir: str, spec: str | None, vocab_size: int):
    """``spec`` (``byte`` or a SentencePiece path), else the export's own tokenizer
    (``train.data.tokenizer.load_export_tokenizer``: the record in its tokenizer_config.json, the ``tokenizer.json``
    record that train/ writes beside a checkpoint's ``model/`` export (in DIR or its parent; an export's transformers
    ``tokenizer.json`` is passed over), else DIR's ``tokenizer.model``)."""
    from train.data.tokenizer import load_export_tokenizer

    try:
        tokenizer = load_export_tokenizer(model_dir, vocab_size, spec)
    except ValueError as e:
        raise ValueError(f"--tokenizer: {e}") from None
    for name in ("<|im_end|>", "<|im_start|>"):
        if name not in tokenizer.special_ids:
            raise ValueError(f"--tokenizer: has no {name} token; the InternLM2 chat template needs it")
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Engines: one thread each, commands in, step outputs out


class _Worker:
    """A thread that serves commands; outputs go to the asyncio queue of each request's key."""

    def __init__(self):
        self.commands: queue.Queue = queue.Queue()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.outputs: dict[int, asyncio.Queue] = {}      # key -> the handler's queue (loop thread only)
        self.stats = {"running": 0, "queued": 0, "cancelled": 0, "finished": 0}
        self.thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread.start()

    def stop(self) -> None:
        self.commands.put(("stop", None, None))
        self.thread.join(timeout=30)

    def submit(self, key: int, req: GenerationRequest) -> asyncio.Queue:
        out: asyncio.Queue = asyncio.Queue()
        self.outputs[key] = out
        self.commands.put(("submit", key, req))
        return out

    def cancel(self, key: int) -> None:
        if self.outputs.pop(key, None) is not None:
            self.commands.put(("cancel", key, None))

    def done(self, key: int) -> None:
        self.outputs.pop(key, None)

    def _send(self, key: int, item) -> None:
        """From the worker thread: hand ``item`` (a StepOutput or an Exception) to the handler of ``key``."""
        def put():
            out = self.outputs.get(key)
            if out is not None:
                out.put_nowait(item)
        self.loop.call_soon_threadsafe(put)

    def _run(self) -> None:
        raise NotImplementedError


class Engine(_Worker):
    """The ContinuousBatchingGenerator behind the server (module docstring)."""

    def __init__(self, generator, stop_ids: tuple[int, ...]):
        super().__init__()
        self.generator, self.stop_ids = generator, stop_ids
        self.key_of: dict[int, int] = {}                  # generator request id -> key (worker thread only)
        self.id_of: dict[int, int] = {}
        self.default_rng = torch.Generator(generator.device).manual_seed(int.from_bytes(os.urandom(8), "little"))

    @property
    def capacity(self) -> int:
        return self.generator.max_batch

    def _apply(self, command: str, key: int, req: GenerationRequest | None) -> bool:
        if command == "stop":
            return False
        gen = self.generator
        if command == "submit":
            rng = self.default_rng
            if req.seed is not None:
                rng = torch.Generator(gen.device).manual_seed(req.seed)
            try:
                rid = gen.submit(req.prompt, req.max_tokens, req.temperature, req.top_p, req.top_k,
                                 () if req.ignore_eos else self.stop_ids, rng)
            except ValueError as e:           # the handler checked already; a disagreement is still the request's
                self._send(key, APIError(400, str(e)))
                return True
            self.key_of[rid], self.id_of[key] = key, rid
        elif command == "cancel":
            rid = self.id_of.pop(key, None)
            if rid is not None:
                self.key_of.pop(rid)
                gen.cancel(rid)
                self.stats["cancelled"] += 1
        return True

    def _run(self) -> None:
        gen = self.generator
        with torch.inference_mode():
            while True:
                try:    # wait while idle; between steps take whatever arrived
                    commands = [self.commands.get(block=not gen.busy)]
                except queue.Empty:
                    commands = []
                while not self.commands.empty():
                    commands.append(self.commands.get())
                if not all([self._apply(*c) for c in commands]):
                    return
                if gen.busy:
                    try:
                        outputs = gen.step()
                    except Exception as e:          # keep serving: fail the requests in flight, free everything
                        traceback.print_exc()
                        for rid, key in list(self.key_of.items()):
                            gen.cancel(rid)
                            self._send(key, RuntimeError(f"generation failed: {e}"))
                        self.key_of.clear()
                        self.id_of.clear()
                        outputs = []
                    for o in outputs:
                        key = self.key_of.get(o.request_id)
                        if o.finish_reason is not None and key is not None:
                            del self.key_of[o.request_id], self.id_of[key]
                            self.stats["finished"] += 1
                        if key is not None:
                            self._send(key, o)
                self.stats.update(running=gen.num_running, queued=gen.num_queued, free_pages=len(gen.pool.free),
                                  total_pages=gen.pool.capacity)


class TransformersEngine(_Worker):
    """transformers' ``generate``, one request at a time, streaming through a ``BaseStreamer`` and cancelled through
    a ``StoppingCriteria`` (the benchmark's peer)."""

    def __init__(self, model, stop_ids: tuple[int, ...]):
        super().__init__()
        self.model, self.stop_ids = model, stop_ids
        self.cancelled: set[int] = set()

    capacity = 1

    def cancel(self, key: int) -> None:
        if self.outputs.pop(key, None) is not None:
            self.cancelled.add(key)
            self.stats["cancelled"] += 1

    def _run(self) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        from .serving import StepOutput

        engine = self

        class Streamer(BaseStreamer):
            def __init__(self, key):
                self.key, self.prompt_seen = key, False

            def put(self, value):
                if not self.prompt_seen:            # generate() hands the prompt over first
                    self.prompt_seen = True
                    return
                engine._send(self.key, StepOutput(0, value.view(-1).tolist(), []))

            def end(self):
                pass

        class Cancelled(StoppingCriteria):
            def __init__(self, key):
                self.key = key

            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), self.key in engine.cancelled, dtype=torch.bool)

        with torch.inference_mode():
            while True:
                command, key, req = self.commands.get()
                if command == "stop":
                    return
                self.stats["queued"] = self.commands.qsize()
                if key in self.cancelled:
                    self.cancelled.discard(key)
                    continue
                self.stats["running"] = 1
                if req.seed is not None:
                    torch.manual_seed(req.seed)
                sampling = dict(do_sample=True, temperature=req.temperature, top_p=req.top_p,
                                top_k=req.top_k) if req.temperature > 0 else dict(do_sample=False)
                if req.ignore_eos:          # the stop tokens are masked until max_tokens
                    sampling["min_new_tokens"] = req.max_tokens
                prompt = torch.tensor([req.prompt])
                try:
                    out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                              max_new_tokens=req.max_tokens, eos_token_id=list(self.stop_ids),
                                              pad_token_id=self.stop_ids[-1], streamer=Streamer(key),
                                              stopping_criteria=StoppingCriteriaList([Cancelled(key)]), **sampling)
                    new = out[0, len(req.prompt):].tolist()
                    reason = "stop" if new and new[-1] in self.stop_ids else "length"
                    self._send(key, StepOutput(0, [], [], reason))
                    self.stats["finished"] += 1
                except Exception as e:
                    traceback.print_exc()
                    self._send(key, RuntimeError(f"generation failed: {e}"))
                self.cancelled.discard(key)
                self.stats["running"] = 0


# ---------------------------------------------------------------------------------------------------------------
# The app


def build_app(engine: _Worker, tokenizer, model_name: str, max_seq_len: int, max_queue: int):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    stop_ids = engine.stop_ids
    state = {"outstanding": 0, "next_key": 0}      # loop thread only: submitted and not yet finished

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from e
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        check_model(body, model_name)
        return body

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                                         "owned_by": "internlm-kernels",
                                                         "max_model_len": max_seq_len}]})

    async def health(request: Request):
        return JSONResponse({"status": "ok", **engine.stats, "outstanding": state["outstanding"]})

    def admit(req: GenerationRequest) -> tuple[int, asyncio.Queue]:
        if state["outstanding"] >= engine.capacity + max_queue:
            raise APIError(429, f"the server is full ({engine.capacity} running, {max_queue} queued); retry later",
                           None, "server_busy", "rate_limit_error")
        key = state["next_key"]
        state["next_key"] += 1
        state["outstanding"] += 1
        return key, engine.submit(key, req)

    def release(key: int, finished: bool) -> None:
        state["outstanding"] -= 1
        if finished:
            engine.done(key)
        else:
            engine.cancel(key)

    async def events(req: GenerationRequest, out: asyncio.Queue, text: TextStream):
        """(text delta, finish_reason or None) as steps arrive; a matched stop string ends it."""
        while True:
            item = await out.get()
            if isinstance(item, Exception):
                raise item
            delta = text.add(item.tokens)
            if text.stopped:
                yield delta, "stop"
                return
            yield delta, item.finish_reason
            if item.finish_reason is not None:
                return

    async def completions(request: Request, chat: bool):
        try:
            body = await read_body(request)
            parse = chat_request if chat else completion_request
            req = parse(body, tokenizer, max_seq_len)
            key, out = admit(req)
        except APIError as e:
            return error(e)
        text = TextStream(tokenizer, stop_ids, req.stop, req.tools)
        reply = Reply(model_name, chat)
        if req.stream:
            return StreamingResponse(stream(req, key, out, text, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        watcher = asyncio.ensure_future(_disconnected(request))
        finished = False
        try:
            getter = asyncio.ensure_future(_collect(events(req, out, text)))
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:                           # the client left
                getter.cancel()
                return JSONResponse({}, status_code=499)
            reason = getter.result()
            finished = not text.stopped
            content, calls = text.result()
            return JSONResponse(reply.complete(content, calls, finish_reason(reason, text, calls),
                                               usage(len(req.prompt), text.produced)))
        except APIError as e:
            return error(e)
        finally:
            watcher.cancel()
            release(key, finished)

    async def stream(req: GenerationRequest, key: int, out: asyncio.Queue, text: TextStream, reply: Reply):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        finished = False
        try:
            if reply.chat:
                yield sse(reply.chunk({"role": "assistant", "content": ""}))
            reason = "length"
            async for delta, reason_ in events(req, out, text):
                if delta:
                    yield sse(reply.chunk({"content": delta} if reply.chat else delta))
                reason = reason_ or reason
            finished = not text.stopped
            content, calls = text.final()
            if content:
                yield sse(reply.chunk({"content": content} if reply.chat else content))
            if calls:
                yield sse(reply.chunk({"tool_calls": [{"index": 0, **c} for c in calls]}))
            yield sse(reply.chunk(None, finish_reason(reason, text, calls)))
            if req.include_usage:
                yield sse(reply.usage_chunk(usage(len(req.prompt), text.produced)))
        except Exception as e:        # the stream has started: report in-band, as OpenAI does
            body = e.body() if isinstance(e, APIError) else {"error": {"message": str(e), "type": "server_error",
                                                                       "param": None, "code": None}}
            yield sse(body)
        finally:        # also when the client disconnected (the response task is cancelled)
            release(key, finished)
        yield "data: [DONE]\n\n"

    async def chat_completions(request: Request):
        return await completions(request, chat=True)

    async def text_completions(request: Request):
        return await completions(request, chat=False)

    async def not_found(request: Request, exc):
        status = getattr(exc, "status_code", 404)
        return JSONResponse(APIError(status, f"{request.method} {request.url.path}: "
                                             f"{'no such route' if status == 404 else 'method not allowed'}").body(),
                            status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start(asyncio.get_running_loop())
        yield
        engine.stop()

    routes = [Route("/v1/models", models), Route("/health", health),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", text_completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found},
                     lifespan=lifespan)


async def _collect(events) -> str:
    reason = "length"
    async for _, reason_ in events:
        reason = reason_ or reason
    return reason


async def _disconnected(request) -> None:
    """Returns when the client has gone away (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _transformers_model(model_dir: str, dtype: torch.dtype):
    """transformers' Llama from DIR (an InternLM2-layout export is re-exported in the Llama layout first)."""
    from transformers import LlamaForCausalLM

    from . import InternLM2ForCausalLM

    with open(os.path.join(model_dir, "config.json")) as f:
        if json.load(f).get("model_type") == "llama":
            return LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        InternLM2ForCausalLM.from_pretrained(model_dir).save_pretrained(tmp, layout="llama")
        return LlamaForCausalLM.from_pretrained(tmp, dtype=dtype).eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an exported checkpoint directory (config.json + safetensors)")
    p.add_argument("--served-model-name", default=None, help="the model id clients name (default: --model as given)")
    p.add_argument("--tokenizer", default=None, help="byte or a SentencePiece model (default: found beside DIR)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-seq-len", type=int, default=None, help="prompt + reply tokens (default: the model's)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond --max-batch before 429")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--backend", choices=("engine", "transformers"), default="engine")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: float32 on CPU, bf16 on GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.max_queue < 0:
        p.error("--max-queue must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    import uvicorn

    from . import InternLM2ForCausalLM
    from .checkpoint import read_config
    from .serving import ContinuousBatchingGenerator

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    config, _ = read_config(args.model)
    tokenizer = resolve_tokenizer(args.model, args.tokenizer, config.vocab_size)
    stop_ids = (tokenizer.special_ids["<|im_end|>"], tokenizer.eos_id)
    max_seq_len = args.max_seq_len or config.max_position_embeddings
    if args.backend == "engine":
        model = InternLM2ForCausalLM.from_pretrained(args.model, dtype=dtype, device=device).eval()
        engine = Engine(ContinuousBatchingGenerator(model, max_batch=args.max_batch, page_size=args.page_size,
                                                    max_seq_len=max_seq_len), stop_ids)
    else:
        engine = TransformersEngine(_transformers_model(args.model, dtype).to(device), stop_ids)
    app = build_app(engine, tokenizer, args.served_model_name or args.model, max_seq_len, args.max_queue)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
