"""From prompts to a PPO ``Rollout``: verifiable chat prompts, sampling, the reward side, padding.

Prompts are chat conversations up to the reply being generated (``encode_prompt``: the rendered messages and
``<|im_start|>assistant\\n``). The embedded set takes ``train.data.chat.SyntheticChats`` conversations without their last
assistant turn; its ``answer`` is the exact expected reply, so a response is checked by exact match.

The reward side (COOL RLHF): the reward model scores
    render([system: condition(domain)] + prompt messages, generation prompt) + response + <|im_end|>\\n + <reward>
the domain's condition prompt added on the reward side only (the policy never sees it). For a well-formed response
these are exactly ``train.data.preference.score_ids`` of the conditioned conversation; building them from the response
text directly also scores malformed generations (a stray tool call or turn marker), which the chat validation would
refuse. PPO's reward adds, with ``ppo.checker_weight`` > 0, the prompt checker's verdict to that score
(``Generated.rollout``; ``train.rlhf.rewards.checker_scores``); everything else — evaluations, the fast path's rules,
the slow path — sees the reward model's score alone: the learned reward is the part a policy can hack.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import torch

from models.serving import Completion, ContinuousBatchingGenerator
from train.data.chat import IM_END, Message, SyntheticChats, encode_prompt, render
from train.rlhf.hacking import Sample
from train.rlhf.iteration import Rollout
from train.rlhf.rewards import checker_scores


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    task: str
    domain: str                        # the reward model's condition for this prompt
    messages: tuple[Message, ...]      # the conversation before the reply
    answer: str                        # the exact expected reply ("" = no checker)

    def check(self, response: str) -> bool | None:
        return (response.strip() == self.answer) if self.answer else None

    def message_dicts(self) -> list[dict]:
        return [{k: v for k, v in asdict(m).items() if v is not None} for m in self.messages]


class SyntheticPrompts:
    """Random-access prompts of ``train.data.chat.SyntheticChats(seed, split, tasks)``: conversation i without its final
    assistant reply, whose text is the answer."""

    def __init__(self, seed: int, split: str, tasks: Sequence[str], domain: str):
        self.chats = SyntheticChats(seed, split, tasks)
        self.split, self.domain = split, domain

    def __getitem__(self, i: int) -> Prompt:
        conv = self.chats[i]
        return Prompt(f"{self.split}:{i}", conv.task, self.domain, tuple(conv.messages[:-1]), conv.answer)

    def take(self, start: int, count: int) -> list[Prompt]:
        return [self[i] for i in range(start, start + count)]


def response_text(tokenizer, tokens: Sequence[int], stop_ids: Sequence[int]) -> str:
    """The reply's text: its tokens without the trailing stop token."""
    body = list(tokens[:-1]) if tokens and tokens[-1] in stop_ids else list(tokens)
    return tokenizer.decode(body)


def reward_ids(tokenizer, prompt: Prompt, response: str, conditions: Mapping[str, str], reward_id: int) -> list[int]:
    """Token ids the reward model scores for ``response`` to ``prompt`` (module docstring)."""
    messages = list(prompt.messages)
    if conditions:
        if prompt.domain not in conditions:
            raise ValueError(f"reward.conditions: no condition prompt for domain {prompt.domain!r} "
                             f"(known: {', '.join(sorted(conditions))})")
        messages = [Message("system", conditions[prompt.domain])] + messages
    head = tokenizer.encode(render(messages, add_generation_prompt=True))
    return head + tokenizer.encode(response + IM_END + "\n") + [reward_id]


@torch.no_grad()
def score(reward_model, sequences: list[list[int]], device: torch.device, batch_tokens: int = 8192,
          agree: Callable[[int], int] | None = None) -> torch.Tensor:
    """(N,) float32 scores of packed sequences, in chunks of about ``batch_tokens`` tokens. ``agree(chunks)``
    returns the number of chunks every rank must run (the maximum over the ranks: a sharded reward model's forward
    is collective, so every rank calls it equally often); a rank with fewer then splits its sequences into that
    many chunks of nearly equal counts."""
    bounds = [0]
    while bounds[-1] < len(sequences):
        end, tokens = bounds[-1], 0
        while end < len(sequences) and (end == bounds[-1] or tokens + len(sequences[end]) <= batch_tokens):
            tokens += len(sequences[end])
            end += 1
        bounds.append(end)
    if agree is not None:
        chunks = agree(len(bounds) - 1)
        if chunks > len(bounds) - 1:
            bounds = [len(sequences) * i // chunks for i in range(chunks + 1)]
    out = []
    for start, end in zip(bounds, bounds[1:]):
        chunk = sequences[start:end]
        ids = torch.tensor([t for s in chunk for t in s], dtype=torch.long, device=device)
        lengths = torch.tensor([0] + [len(s) for s in chunk], device=device)
        cu = lengths.cumsum(0).to(torch.int32)
        out.append(reward_model(ids, cu).scores.float())
    return torch.cat(out)


class Sampler:
    """The rollout engine: ``models.serving.ContinuousBatchingGenerator`` on the actor, kept across calls (its KV
    pool and, on CUDA, its captured decode graphs, which read the actor's weights in place), rebuilt only when a
    call needs longer sequences than its pool holds."""

    def __init__(self, actor, max_batch: int = 64):
        self.actor, self.max_batch = actor, max_batch
        self.engine = None

    def __call__(self, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 stop_ids: Sequence[int], generators: list[torch.Generator] | None) -> list[Completion]:
        """Completions (new tokens ending with a stop token when one was sampled, and each token's log-prob under
        softmax(logits / temperature)), all prompts decoded together. temperature 0 = greedy (``generators``
        None). ``generators``: one per prompt, so each prompt's reply depends on its own generator alone, not on
        which prompts share its batch (PPO's data-parallel ranks each sample a share of the prompts, and must
        sample what one process would)."""
        need = max(len(p) for p in prompt_ids) + max_new_tokens
        if self.engine is None or self.engine.max_seq_len < need:
            length = min(-(-need // 256) * 256, max(need, self.actor.config.max_position_embeddings))
            self.engine = ContinuousBatchingGenerator(self.actor, max_batch=self.max_batch, max_seq_len=length)
        return self.engine.generate(prompt_ids, max_new_tokens, temperature=temperature,
                                    top_p=top_p if temperature > 0 else 1.0, stop_token_ids=tuple(stop_ids),
                                    generator=generators)


def build_rollout(prompt_ids: list[list[int]], responses: list[list[int]], scores: torch.Tensor, pad_id: int,
                  device: torch.device, sampler_logprobs: list[list[float]] | None = None) -> Rollout:
    """Right-padded (B, S) prompt + response; action t (token t+1) is in the mask when it is a response token.
    ``sampler_logprobs`` (one per response token) land on the same action positions."""
    B = len(prompt_ids)
    S = max(len(p) + len(r) for p, r in zip(prompt_ids, responses))
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    attn = torch.zeros((B, S), dtype=torch.long)
    action = torch.zeros((B, S - 1), dtype=torch.long)
    sampler = None if sampler_logprobs is None else torch.zeros((B, S - 1), dtype=torch.float32)
    for b, (p, r) in enumerate(zip(prompt_ids, responses)):
        n = len(p) + len(r)
        ids[b, :n] = torch.tensor(p + r)
        attn[b, :n] = 1
        action[b, len(p) - 1:n - 1] = 1
        if sampler is not None and r:
            sampler[b, len(p) - 1:n - 1] = torch.tensor(sampler_logprobs[b])
    # clone: scores may be an inference-mode tensor, which the losses must not save for backward
    return Rollout(ids.to(device), attn.to(device), action.to(device), scores.to(device).float().clone(),
                   None if sampler is None else sampler.to(device))


@dataclass
class Generated:
    """One batch of prompts with their sampled responses, texts, checker verdicts and reward-model scores."""
    prompts: list[Prompt]
    prompt_ids: list[list[int]]
    responses: list[list[int]]
    sampler_logprobs: list[list[float]]   # the generator's log-prob of each response token
    texts: list[str]
    correct: list[bool | None]
    scores: torch.Tensor               # (B,) float32 on the device

    def samples(self) -> list[Sample]:
        scores = self.scores.tolist()
        return [Sample(p.prompt_id, p.domain, p.message_dicts(), t, r, s, c)
                for p, t, r, s, c in zip(self.prompts, self.texts, self.responses, scores, self.correct)]

    def accuracy(self) -> float:
        checked = [c for c in self.correct if c is not None]
        return sum(checked) / len(checked) if checked else 0.0


    @staticmethod
    def concat(parts: list["Generated"]) -> "Generated":
        """One batch of ``parts`` in order (the data-parallel ranks' shares of one batch)."""
        return Generated(*(sum((getattr(g, f) for g in parts), []) for f in
                           ("prompts", "prompt_ids", "responses", "sampler_logprobs", "texts", "correct")),
                         torch.cat([g.scores for g in parts]))

    def rollout(self, pad_id: int, device: torch.device, checker_weight: float = 0.0) -> Rollout:
        """The PPO batch; its scores are the reward model's plus ``checker_weight`` x the checker's verdicts."""
        return build_rollout(self.prompt_ids, self.responses, checker_scores(self.scores, self.correct, checker_weight),
                             pad_id, device, self.sampler_logprobs)


def generate_and_score(sampler: Sampler, reward_model, tokenizer, prompts: list[Prompt], *, max_new_tokens: int,
                       temperature: float, top_p: float, stop_ids: Sequence[int], conditions: Mapping[str, str],
                       reward_id: int, generators: list[torch.Generator] | None,
                       device: torch.device, agree: Callable[[int], int] | None = None) -> Generated:
    prompt_ids = [encode_prompt(list(p.messages), tokenizer) for p in prompts]
    completions = sampler(prompt_ids, max_new_tokens, temperature, top_p, stop_ids, generators)
    responses = [c.tokens for c in completions]
    texts = [response_text(tokenizer, r, stop_ids) for r in responses]
    scores = score(reward_model, [reward_ids(tokenizer, p, t, conditions, reward_id) for p, t in zip(prompts, texts)],
                   device, agree=agree)
    return Generated(prompts, prompt_ids, responses, [c.logprobs for c in completions], texts,
                     [p.check(t) for p, t in zip(prompts, texts)], scores)
