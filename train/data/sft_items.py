"""SFT items: conversations with assistant-only labels, plus a share of pretraining documents (``long_context_mix``).

InternLM2 keeps long-context pretraining data in the SFT mix so that long-context ability survives alignment.
Item ``i`` of the stream is a pretraining document (every token a target, as in pretraining) with probability
``long_context_mix`` (drawn from (seed, i): deterministic, so a resumed run sees the same items), else
conversation ``i`` of the conversation source (``SyntheticChats``, or a list read from jsonl and repeated in
epochs). Conversations are encoded by ``train.data.chat.encode`` (labels -100 except assistant turns).
"""
from __future__ import annotations

import random
from typing import Callable

from train.data.chat import Conversation, encode
from train.data.items import Item
from train.data.tokenizer import Tokenizer

KIND_CONVERSATION, KIND_PRETRAIN = 0, 1   # Item.group: what an item is (metrics count both)


class SFTItems:
    """``items(i) -> Item`` (module docstring). ``conversations``: a list (repeated in epochs) or a random-access
    stream such as ``SyntheticChats``; ``documents(i)``: pretraining document i."""

    def __init__(self, conversations, tokenizer: Tokenizer,
                 long_context_mix: float = 0.0, documents: Callable[[int], str] | None = None, seed: int = 0):
        if not 0.0 <= long_context_mix < 1.0:
            raise ValueError(f"sft.long_context_mix must be in [0, 1), got {long_context_mix!r}")
        if long_context_mix > 0 and documents is None:
            raise ValueError("sft.long_context_mix > 0 needs a source of pretraining documents")
        if isinstance(conversations, (list, tuple)):   # a finite set, repeated in epochs
            if not conversations:
                raise ValueError("sft: no conversations")
            self._conversation: Callable[[int], Conversation] = lambda i: conversations[i % len(conversations)]
        else:                                            # a random-access stream (SyntheticChats)
            self._conversation = conversations.__getitem__
        self.tokenizer, self.mix, self.documents, self.seed = tokenizer, long_context_mix, documents, seed

    def is_document(self, i: int) -> bool:
        return self.mix > 0 and random.Random(f"sft-mix:{self.seed}:{i}").random() < self.mix

    def __call__(self, i: int) -> Item:
        if self.is_document(i):
            ids = self.tokenizer.encode(self.documents(i), add_bos=True, add_eos=True)
            return Item([(ids, list(ids))], KIND_PRETRAIN)
        conv = self._conversation(i)
        ids, labels = encode(conv.messages, self.tokenizer, where=f"conversation {i}")
        return Item([(ids, labels)], KIND_CONVERSATION)
