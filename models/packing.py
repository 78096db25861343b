"""Model inputs, padded or packed, as packed tokens: validation, packing, and the next-token targets.

Every forward of the model runs over packed tokens (input_ids (T,) with cu_seqlens (B+1,) int32). A padded
(B, S) batch with an attention mask is packed first (only the valid tokens run) and unpacked at the end.

No device-to-host read on the training path: packed input with a host-known ``max_seqlen`` (the trainer's packer
gives it) reads no tensor value. Checks of tensor values (ids inside the vocabulary, a 0/1 attention mask,
non-negative positions; cu_seqlens in the kernels' own checks) run only where reading costs no device sync.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from internlm_kernels._checks import check_cu_seqlens, check_tensor

IGNORE_INDEX = -100


def reads_values(t: torch.Tensor) -> bool:
    """Whether a value check may read ``t``: a CPU tensor outside torch.compile tracing (reading a GPU tensor
    would drain the device queue; a traced one has no values)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


@dataclass
class PackedInputs:
    """The batch as packed tokens, and how to put per-token results back into the caller's layout."""
    input_ids: torch.Tensor               # (T,) int64
    cu_seqlens: torch.Tensor              # (B+1,) int32
    max_seqlen: int
    positions: torch.Tensor | None        # (T,) explicit rotary positions; None: restart at 0 per sequence
    padded_shape: tuple[int, int] | None  # (B, S) when the caller passed a padded batch
    valid_index: torch.Tensor | None      # (T,) flat indices of the valid tokens in B*S; None: all valid

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) in the caller's padded layout -> (T, ...) packed; packed input passes through."""
        if self.padded_shape is None:
            return t
        flat = t.reshape(-1, *t.shape[2:])
        return flat if self.valid_index is None else flat[self.valid_index]

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        """(T, ...) packed -> the caller's layout; padding positions are zero."""
        if self.padded_shape is None:
            return t
        B, S = self.padded_shape
        if self.valid_index is None:
            return t.reshape(B, S, *t.shape[1:])
        out = t.new_zeros(B * S, *t.shape[1:])
        out[self.valid_index] = t
        return out.reshape(B, S, *t.shape[1:])


def pack_inputs(input_ids, cu_seqlens=None, attention_mask=None, position_ids=None,
                vocab_size: int | None = None, max_seqlen: int | None = None) -> PackedInputs:
    """Validate the forward's inputs and pack them (see the module docstring). ``max_seqlen``: the longest
    packed sequence when the caller knows it; None reads it from cu_seqlens (a device-to-host sync)."""
    check_tensor("input_ids", input_ids, dtypes=(torch.int64, torch.int32), ndim=(1, 2))
    device = input_ids.device
    if input_ids.dim() == 1:
        if attention_mask is not None:
            raise ValueError("attention_mask is for padded (B, S) input_ids; packed (T,) input takes cu_seqlens")
        T = input_ids.shape[0]
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, T], dtype=torch.int32, device=device)
        check_cu_seqlens("cu_seqlens", cu_seqlens, T, device)
        padded_shape, valid_index = None, None
        ids = input_ids
    else:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens is for packed (T,) input_ids; padded (B, S) input takes attention_mask")
        B, S = input_ids.shape
        padded_shape = (B, S)
        if attention_mask is None:
            lengths = torch.full((B,), S, dtype=torch.int32, device=device)
            valid_index = None
            ids = input_ids.reshape(-1)
        else:
            check_tensor("attention_mask", attention_mask, ndim=2, device=device)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
                                 f"{tuple(input_ids.shape)}")
            if reads_values(attention_mask) and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("attention_mask must hold only 0 and 1")
            mask = attention_mask.bool()
            lengths = mask.sum(dim=1, dtype=torch.int32)
            valid_index = mask.reshape(-1).nonzero().squeeze(1)
            ids = input_ids.reshape(-1)[valid_index]
        cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    if vocab_size is not None and ids.numel() and reads_values(ids) and bool(((ids < 0) | (ids >= vocab_size)).any()):
        raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size})")
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    positions = None
    if position_ids is not None:
        check_tensor("position_ids", position_ids, dtypes=(torch.int64, torch.int32), device=device)
        if position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} differs from input_ids shape "
                             f"{tuple(input_ids.shape)}")
        flat = position_ids.reshape(-1)
        positions = (flat if valid_index is None else flat[valid_index]).long()
        if positions.numel() and reads_values(positions) and bool((positions < 0).any()):
            raise ValueError("position_ids must be >= 0")
    return PackedInputs(ids.long(), cu_seqlens, max_seqlen, positions, padded_shape, valid_index)


def shift_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """HF-convention labels (T,) -> next-token targets (T,): token i predicts labels[i + 1] of the same sequence;
    the last token of each sequence predicts nothing (IGNORE_INDEX), so no document predicts the next one."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:-1] = labels[1:]
    # An empty sequence's end index repeats the previous end (or is -1 = the last token, also an end).
    targets[cu_seqlens[1:].long() - 1] = IGNORE_INDEX
    return targets
