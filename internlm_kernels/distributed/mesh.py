"""The device mesh of a run that combines data and tensor parallelism.

Ranks are laid out as (replicate, shard, tp), tensor-parallel ranks innermost: the ``tp`` ranks of one
data-parallel group are consecutive (one node: the tensor-parallel collectives stay on NVLink), a shard group is
``shard_size`` consecutive data-parallel groups, and the replica groups repeat it. So

    rank = (replicate * shard_size + shard) * tp + tp_rank,      data-parallel rank = rank // tp.

``mesh["tp"]`` is what ``parallelize_internlm2`` splits a model over; ``data_parallel_mesh(mesh)`` is what FSDP2 /
ZeRO shard and replicate over (1-D when there is one replica group, 2-D ("replicate", "shard") for HSDP / hybrid
ZeRO). Sub-meshes of one root mesh are what FSDP2 needs to compose with tensor-parallel DTensor parameters.
"""
from __future__ import annotations

DIMS = ("replicate", "shard", "tp")


def parallel_mesh(tp: int = 1, shard_size: int | None = None, device_type: str = "cpu"):
    """The (replicate, shard, tp) mesh over the whole world. ``shard_size``: data-parallel ranks per shard group
    (default: all of them, one replica group)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1 or world % tp:
        raise ValueError(f"tp ({tp!r}) must be a positive int dividing the world size ({world})")
    dp = world // tp
    shard_size = dp if shard_size is None else shard_size
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1 or dp % shard_size:
        raise ValueError(f"shard_size ({shard_size!r}) must be a positive int dividing the data-parallel size "
                         f"({dp} = world {world} / tp {tp})")
    return init_device_mesh(device_type, (dp // shard_size, shard_size, tp), mesh_dim_names=DIMS)


def data_parallel_mesh(mesh):
    """The data-parallel part of a ``parallel_mesh``: ("shard",) with one replica group, else ("replicate",
    "shard")."""
    return mesh["shard"] if mesh["replicate"].size() == 1 else mesh["replicate", "shard"]
