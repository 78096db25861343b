"""Scale-out on torch.distributed: hybrid ZeRO with overlapped collectives, FSDP2 per block, tensor/sequence
parallelism for InternLM2 and a vocabulary-parallel fused linear cross-entropy. docs/distributed.md explains the
design and its communication volumes."""
from .zero import CollectiveEvent, CollectiveSchedule, ZeroDataParallel

__all__ = ["ZeroDataParallel", "CollectiveSchedule", "CollectiveEvent"]
