"""Packing whole items into micro-batches of a token budget (SFT conversations, reward-model pairs).

Pretraining cuts documents at row ends (``train.data.packing.PackedStream``); alignment data must not be cut: a cut
conversation loses its answer, a cut pair loses its reward token. Here an *item* is one or more sequences that
stay together (an SFT conversation: one; a preference pair: chosen and rejected, adjacent, in one micro-batch).
Micro-batches are filled greedily with whole items in source order up to ``micro_batch_tokens`` (a fixed token
count, as InternLM2's reward model batches 16,384 tokens rather than a number of pairs); the item that does not
fit opens the next micro-batch. Every sequence is its own document in ``cu_seqlens``.

Over-long items, by the rule ``overlong``:
    "drop":     an item with a sequence longer than ``max_seq_len`` is skipped;
    "truncate": each such sequence keeps its first ``max_seq_len`` tokens (SFT: the tail of the conversation
                goes; never allowed for pairs, whose reward token sits at the end).
Both are counted (``dropped`` / ``truncated`` in the state and the metrics). ``micro_batch_tokens`` must hold
the largest item allowed, so no item is ever dropped for the budget.

Steps and ranks: a step is ``accumulation * world`` micro-batches, ``world`` the data-parallel size; data-parallel
rank r takes micro-batches r, r + world, ... (the tensor-parallel ranks of one data-parallel group take the same
ones; all ranks read the same item stream, so the state is the same on every rank). The state (next item index and
the counters) restores the stream exactly, since sources are random-access and deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from models.packing import IGNORE_INDEX
from train.data.packing import Batch

OVERLONG_RULES = ("drop", "truncate")
MAX_CONSECUTIVE_DROPS = 1000   # more over-long items in a row than this: max_seq_len is wrong, not the data


@dataclass
class Item:
    sequences: list[tuple[list[int], list[int]]]   # (input_ids, labels) per sequence; labels -100 where no loss
    group: int = 0                                  # a tag kept per item (reward model: the domain's index)
    truncated: bool = False                         # set by the packer's "truncate" rule

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.sequences)


@dataclass
class ItemBatch(Batch):
    """``train.data.packing.Batch`` (sequences concatenated, one document each) plus which items they came from."""
    seqs_per_item: int = 1
    groups: list[int] = field(default_factory=list)     # (items,) host-side tags

    def to(self, device: torch.device) -> "ItemBatch":
        moved = super().to(device)
        return ItemBatch(moved.input_ids, moved.labels, moved.cu_seqlens, moved.max_seqlen, moved.num_targets,
                         self.seqs_per_item, list(self.groups))


def collate_items(items: list[Item]) -> ItemBatch:
    if not items:
        raise ValueError("items: need at least one item")
    per_item = {len(it.sequences) for it in items}
    if len(per_item) != 1:
        raise ValueError(f"items: every item of a batch needs the same number of sequences, got {sorted(per_item)}")
    ids: list[int] = []
    labels: list[int] = []
    cu = [0]
    targets = 0
    for it in items:
        for seq_ids, seq_labels in it.sequences:
            ids += seq_ids
            labels += seq_labels
            cu.append(len(ids))
            targets += sum(1 for t in seq_labels[1:] if t != IGNORE_INDEX)   # the first token predicts nothing
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    return ItemBatch(torch.tensor(ids, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64),
                     torch.tensor(cu, dtype=torch.int32), max(lengths), targets, per_item.pop(),
                     [it.group for it in items])


def budget_groups(items: list[Item], batch_tokens: int) -> Iterator[list[Item]]:
    """A finite list of items (an evaluation set) in consecutive groups of at most ``batch_tokens`` tokens (an
    item larger than the budget forms a group alone)."""
    group: list[Item] = []
    used = 0
    for item in items:
        if group and used + item.num_tokens > batch_tokens:
            yield group
            group, used = [], 0
        group.append(item)
        used += item.num_tokens
    if group:
        yield group


class ItemBatches:
    """Resumable steps of whole-item micro-batches (module docstring). ``source(i)`` returns item i."""

    def __init__(self, source: Callable[[int], Item], micro_batch_tokens: int, max_seq_len: int,
                 accumulation: int = 1, overlong: str = "drop", rank: int = 0, world: int = 1,
                 max_seqs_per_item: int = 1, where: str = "data"):
        if overlong not in OVERLONG_RULES:
            raise ValueError(f"{where}.overlong must be one of {', '.join(OVERLONG_RULES)}, got {overlong!r}")
        if overlong == "truncate" and max_seqs_per_item > 1:
            raise ValueError(f"{where}.overlong = 'truncate' would cut the end of a pair; use 'drop'")
        if max_seq_len < 2:
            raise ValueError(f"{where}.max_seq_len must be >= 2, got {max_seq_len}")
        if micro_batch_tokens < max_seq_len * max_seqs_per_item:
            raise ValueError(f"{where}.micro_batch_tokens ({micro_batch_tokens}) must hold the largest item: "
                             f"{max_seqs_per_item} x max_seq_len ({max_seq_len})")
        if accumulation < 1 or not 0 <= rank < world:
            raise ValueError(f"accumulation must be >= 1 and rank in [0, world), got {accumulation}, {rank}/{world}")
        self.source, self.budget, self.max_seq_len, self.where = source, micro_batch_tokens, max_seq_len, where
        self._drop_run = 0
        self._step_tokens = 0
        self.accumulation, self.overlong, self.rank, self.world = accumulation, overlong, rank, world
        self.next_item = 0
        self.items = self.dropped = self.truncated = 0
        self._peeked: tuple[int, Item | None] | None = None   # (index, item after the overlong rule; None: dropped)

    def _peek(self) -> Item:
        """The next admissible item (dropped ones are consumed and counted on the way)."""
        while True:
            if self._peeked is None or self._peeked[0] != self.next_item:
                item = self.source(self.next_item)
                if any(len(ids) > self.max_seq_len for ids, _ in item.sequences):
                    if self.overlong == "drop":
                        item = None
                    else:
                        item = Item([(ids[:self.max_seq_len], labels[:self.max_seq_len])
                                     for ids, labels in item.sequences], item.group, truncated=True)
                self._peeked = (self.next_item, item)
            item = self._peeked[1]
            if item is not None:
                self._drop_run = 0
                return item
            self.dropped += 1
            self.next_item += 1
            self._drop_run += 1
            run = self._drop_run
            if run >= MAX_CONSECUTIVE_DROPS:
                raise ValueError(f"{self.where}: max_seq_len ({self.max_seq_len}; stages.0.seq_len in a stage config) "
                                 f"is too small: the last {run} "
                                 "items were all longer and dropped")

    def _take(self) -> Item:
        item = self._peek()
        if item.truncated:
            self.truncated += 1
        self.next_item += 1
        self.items += 1
        return item

    def next_micro_batch(self) -> ItemBatch:
        items = [self._take()]
        used = items[0].num_tokens
        while used + self._peek().num_tokens <= self.budget:
            used += self._peek().num_tokens
            items.append(self._take())
        return collate_items(items)

    @property
    def tokens_per_step(self) -> int:
        """Global tokens of the step just produced (whole items fill a budget, so steps differ a little); before
        the first step, the budget. Read by the Trainer for throughput."""
        return self._step_tokens or self.budget * self.accumulation * self.world

    def next_step(self) -> list[ItemBatch]:
        """This rank's micro-batches of the next step (every rank advances the stream identically)."""
        micro = [self.next_micro_batch() for _ in range(self.accumulation * self.world)]
        self._step_tokens = sum(int(m.cu_seqlens[-1]) for m in micro)     # host tensors: no device read
        return micro[self.rank::self.world]

    def state_dict(self) -> dict:
        return {"next_item": self.next_item, "items": self.items, "dropped": self.dropped,
                "truncated": self.truncated}

    def load_state_dict(self, state: dict) -> None:
        self.next_item, self.items = int(state["next_item"]), int(state["items"])
        self.dropped, self.truncated = int(state["dropped"]), int(state["truncated"])
        self._peeked = None
