"""Scale-out on torch.distributed: hybrid ZeRO with overlapped collectives, FSDP2 per block, tensor/sequence
parallelism for InternLM2 and a vocabulary-parallel fused linear cross-entropy, combined on a (replicate, shard, tp)
mesh. docs/distributed.md explains the design and its communication volumes."""
from .mesh import data_parallel_mesh, parallel_mesh
from .zero import CollectiveEvent, CollectiveSchedule, ZeroDataParallel

__all__ = ["ZeroDataParallel", "CollectiveSchedule", "CollectiveEvent", "parallel_mesh", "data_parallel_mesh"]
