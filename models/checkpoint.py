"""HF-layout checkpoint directories: config.json + safetensors (one file, or shards with an index), in InternLM2's
layout or in transformers' Llama layout (wqkv split into q_proj / k_proj / v_proj).

Loading checks everything before reading a weight: config.json parses, every shard named by the index exists, each
tensor is in exactly one shard, and the names and shapes are exactly the model's (the error lists every missing,
unexpected and mis-shaped tensor). Only then are tensors read, converted (dtype, Llama -> InternLM2) and assigned to
a model built on the meta device, so a bad directory leaves nothing half-loaded and a good one is read once.
Writing goes to a temporary directory beside the target, which is renamed into place when complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import InternLM2Config

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
LAYOUTS = ("internlm2", "llama")

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded into the model as it is."""


# --------------------------------------------------------------------------------------------------
# Llama layout
# --------------------------------------------------------------------------------------------------
_LLAMA_NAMES = {  # InternLM2 suffix -> Llama suffix, per layer
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LLAMA_TOP = {"model.tok_embeddings.weight": "model.embed_tokens.weight", "model.norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_WQKV = "attention.wqkv.weight"
_QKV_PROJ = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")


def _layer_split(name: str) -> tuple[str, str] | None:
    """'model.layers.3.attention.wo.weight' -> ('model.layers.3.', 'attention.wo.weight')."""
    if not name.startswith("model.layers."):
        return None
    idx, _, suffix = name[len("model.layers."):].partition(".")
    return f"model.layers.{idx}.", suffix


def split_wqkv(wqkv: torch.Tensor, config: InternLM2Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed wqkv ((Hq + 2 Hkv) · D, hidden), rows grouped per KV head as [g query heads, k, v], -> q_proj
    (Hq · D, hidden), k_proj and v_proj (Hkv · D, hidden). Query head j of group i becomes head i · g + j, which
    Llama's GQA maps back to KV head i."""
    Hkv, g, D = config.num_key_value_heads, config.num_query_groups, config.head_dim
    w = wqkv.reshape(Hkv, g + 2, D, wqkv.shape[-1])
    return (w[:, :g].reshape(Hkv * g * D, -1).clone(), w[:, g].reshape(Hkv * D, -1).clone(),
            w[:, g + 1].reshape(Hkv * D, -1).clone())


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: InternLM2Config) -> torch.Tensor:
    """Inverse of ``split_wqkv``."""
    Hkv, g, D = config.num_key_value_heads, config.num_query_groups, config.head_dim
    hidden = q.shape[-1]
    parts = (q.reshape(Hkv, g, D, hidden), k.reshape(Hkv, 1, D, hidden), v.reshape(Hkv, 1, D, hidden))
    return torch.cat(parts, dim=1).reshape(config.qkv_size, hidden)


def to_llama_state_dict(state_dict: Mapping[str, torch.Tensor], config: InternLM2Config) -> dict[str, torch.Tensor]:
    """InternLM2 names -> transformers LlamaForCausalLM names (wqkv split). Unknown names raise CheckpointError."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        parts = _layer_split(name)
        if name in _LLAMA_TOP:
            out[_LLAMA_TOP[name]] = t
        elif parts and parts[1] == _WQKV:
            for proj, w in zip(_QKV_PROJ, split_wqkv(t, config)):
                out[parts[0] + proj] = w
        elif parts and parts[1] in _LLAMA_NAMES:
            out[parts[0] + _LLAMA_NAMES[parts[1]]] = t
        else:
            raise CheckpointError(f"{name!r} has no Llama equivalent")
    return out


def from_llama_state_dict(state_dict: Mapping[str, torch.Tensor],
                          config: InternLM2Config) -> dict[str, torch.Tensor]:
    """transformers Llama names -> InternLM2 names (q/k/v_proj merged into wqkv). Unknown names, or a layer
    without all three projections, raise CheckpointError."""
    top = {v: k for k, v in _LLAMA_TOP.items()}
    per_layer = {v: k for k, v in _LLAMA_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for name, t in state_dict.items():
        parts = _layer_split(name)
        if name in top:
            out[top[name]] = t
        elif parts and parts[1] in _QKV_PROJ:
            qkv.setdefault(parts[0], {})[parts[1]] = t
        elif parts and parts[1] in per_layer:
            out[parts[0] + per_layer[parts[1]]] = t
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"tensors with no InternLM2 equivalent: {', '.join(sorted(unknown))}")
    D, h = config.head_dim, config.hidden_size
    want = dict(zip(_QKV_PROJ, ((config.num_attention_heads * D, h), (config.num_key_value_heads * D, h),
                                (config.num_key_value_heads * D, h))))
    for prefix, projs in qkv.items():
        missing = [p for p in _QKV_PROJ if p not in projs]
        if missing:
            raise CheckpointError(f"{prefix} lacks {', '.join(missing)} (needed to build wqkv)")
        wrong = [f"{prefix}{p}: checkpoint {tuple(t.shape)} vs model {want[p]}" for p, t in projs.items()
                 if tuple(t.shape) != want[p]]
        if wrong:
            raise CheckpointError("wrong shape (cannot build wqkv): " + "; ".join(wrong))
        out[prefix + _WQKV] = merge_qkv(*(projs[p] for p in _QKV_PROJ), config)
    return out


def llama_config_dict(config: InternLM2Config, dtype: str | None = None) -> dict:
    """config.json for transformers' LlamaConfig computing the same function (rope scaling in both the
    transformers 4 ``rope_scaling`` and 5 ``rope_parameters`` spelling)."""
    d = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "initializer_range": config.initializer_range,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
        "rope_theta": config.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
    }
    if config.rope_scaling:
        kind, factor = config.rope_scaling["type"], config.rope_scaling["factor"]
        d["rope_scaling"] = {"rope_type": kind, "type": kind, "factor": factor}
        d["rope_parameters"] = {"rope_type": kind, "factor": factor, "rope_theta": config.rope_theta}
    if dtype is not None:
        d["torch_dtype"] = dtype
    return d


def config_from_llama_dict(d: dict) -> InternLM2Config:
    """InternLM2Config from a transformers Llama config.json; options that change the math and that InternLM2 does
    not have raise NotImplementedError."""
    for key in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if d.get(key):
            raise NotImplementedError(f"Llama config has {key}=True, which InternLM2 does not implement")
    if d.get("attention_dropout", 0.0):
        raise NotImplementedError(f"attention_dropout={d['attention_dropout']} is not implemented")
    rope = d.get("rope_parameters") or {}
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("partial_rotary_factor != 1 is not implemented")
    scaling = d.get("rope_scaling")
    if rope:
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "initializer_range", "bos_token_id",
            "eos_token_id", "pad_token_id", "hidden_act", "head_dim")
    internlm = {k: d[k] for k in keys if k in d and d[k] is not None}
    internlm["num_key_value_heads"] = d.get("num_key_value_heads") or d["num_attention_heads"]
    internlm["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    internlm["rope_scaling"] = scaling
    return InternLM2Config.from_hf_dict(internlm)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def read_config(path) -> tuple[InternLM2Config, str]:
    """(config, layout) of a checkpoint directory; layout is 'internlm2' or 'llama' by config.json's model_type."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise CheckpointError(f"{str(path)!r} has no {CONFIG_NAME}")
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None
    model_type = d.get("model_type", "internlm2")
    try:
        if model_type == "llama":
            return config_from_llama_dict(d), "llama"
        return InternLM2Config.from_hf_dict(d), "internlm2"
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def tensor_files(path) -> dict[str, Path]:
    """Which safetensors file holds each tensor, from the index or the single file; every file must exist and
    hold exactly the tensors the index says."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{str(path)!r}: shard(s) named in {INDEX_FILE} are missing: {', '.join(missing)}")
        files: dict[str, Path] = {}
        for shard in shards:
            with safe_open(path / shard, framework="pt") as f:
                held = set(f.keys())
            claimed = {n for n, s in weight_map.items() if s == shard}
            if held != claimed:
                raise CheckpointError(
                    f"{path / shard}: holds {sorted(held - claimed)[:8]} not indexed there and lacks "
                    f"{sorted(claimed - held)[:8]} that the index puts there")
            files.update({n: path / shard for n in held})
        return files
    single = path / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{str(path)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    with safe_open(single, framework="pt") as f:
        return {n: single for n in f.keys()}


def tensor_shapes(files: Mapping[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shapes from the safetensors headers, reading no tensor data."""
    shapes = {}
    for file in sorted(set(files.values())):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def check_names_and_shapes(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                           where: str) -> None:
    """Raise CheckpointError listing every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(f"{n}: checkpoint {tuple(found[n])} vs model {tuple(expected[n])}"
                   for n in set(found) & set(expected) if tuple(found[n]) != tuple(expected[n]))
    if missing or unexpected or wrong:
        lines = [f"checkpoint {where} does not match the model:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected)}")
        if wrong:
            lines.append(f"  wrong shape ({len(wrong)}): " + "; ".join(wrong))
        raise CheckpointError("\n".join(lines))


def read_tensors(files: Mapping[str, Path], names, dtype: torch.dtype | None = None,
                 device=None) -> dict[str, torch.Tensor]:
    """The named tensors, each converted to ``dtype`` (floating tensors only) and moved to ``device``."""
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    out = {}
    for file, file_names in by_file.items():
        with safe_open(file, framework="pt") as f:
            for n in file_names:
                t = f.get_tensor(n)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                out[n] = t.to(device) if device is not None else t
    return out


def load_model(cls, path, dtype: torch.dtype | None = None, device=None):
    """Build ``cls`` (InternLM2ForCausalLM or InternLM2ForScore) from a checkpoint directory (see module doc).

    A score model accepts a causal-LM checkpoint: the trunk loads, ``output.weight`` is dropped and
    ``score_head`` is initialized fresh."""
    path = Path(path)
    config, layout = read_config(path)
    with torch.device("meta"):
        model = cls(config)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    files = tensor_files(path)
    shapes = tensor_shapes(files)
    if layout == "llama":
        meta = {n: torch.empty(s, device="meta") for n, s in shapes.items()}
        shapes = {n: tuple(t.shape) for n, t in from_llama_state_dict(meta, config).items()}
    fresh = set()
    if "score_head.weight" in expected and "score_head.weight" not in shapes and "output.weight" in shapes:
        shapes.pop("output.weight")
        fresh = {"score_head.weight"}
    check_names_and_shapes(shapes, {n: s for n, s in expected.items() if n not in fresh}, repr(str(path)))
    if layout == "llama":
        llama_names = [n for n in files if n != "lm_head.weight" or "output.weight" in shapes]
        state = from_llama_state_dict(read_tensors(files, llama_names, dtype, device), config)
    else:
        state = read_tensors(files, list(shapes), dtype, device)
    for name in fresh:
        state[name] = torch.empty(expected[name], dtype=dtype or next(iter(state.values())).dtype, device=device)
    model.load_state_dict(state, strict=True, assign=True)
    if fresh:
        with torch.no_grad():
            for name in fresh:
                model.get_parameter(name).normal_(0.0, config.initializer_range)
    return model


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def _shards(state: Mapping[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in order, cut into shards of at most max_shard_bytes (a larger tensor gets a shard alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def fsync_path(path) -> None:
    """fsync a file or a directory (a directory's fsync makes a rename inside it durable). The one fsync of the
    repository: the trainer's checkpoints (train/checkpoint.py) use it too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path) -> None:
    """fsync every file and directory under ``path`` (before a rename publishes it)."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def write_checkpoint(path, state: Mapping[str, torch.Tensor], config_dict: dict,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write config.json and the tensors (sharded with an index above max_shard_bytes) into ``path`` atomically:
    everything goes to a temporary directory beside it, which replaces ``path`` only once complete."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:  # everything into tmp; on any failure tmp goes and the previous checkpoint at path is untouched
        tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint should read like any directory
        state = {n: t.detach().to("cpu").contiguous() for n, t in state.items()}
        shards = _shards(state, max_shard_bytes)
        names = ([SINGLE_FILE] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for name, shard in zip(names, shards):
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            fsync_path(tmp / name)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": {n: name for name, shard in zip(names, shards) for n in shard}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            fsync_path(tmp / INDEX_FILE)
        (tmp / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2) + "\n")
        fsync_path(tmp / CONFIG_NAME)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # A directory cannot be renamed over a non-empty one: move the previous checkpoint aside first, and back if
    # the rename fails; it is deleted only once the new one is in place.
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / path.name)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old / path.name, path)
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(path.parent)
    if old is not None:
        shutil.rmtree(old)


def save_model(model, path, dtype: torch.dtype | None = None, layout: str = "internlm2",
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if dtype is not None and dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, _DTYPE_NAMES))}, got {dtype}")
    config = model.config
    state = {n: (t.to(dtype) if dtype is not None else t) for n, t in model.state_dict().items()}
    dtypes = {t.dtype for t in state.values()}
    dtype_name = _DTYPE_NAMES.get(dtypes.pop()) if len(dtypes) == 1 else None
    if layout == "llama":
        if "score_head.weight" in state:
            raise NotImplementedError("layout='llama' is for the causal LM; a score model has no Llama class")
        write_checkpoint(path, to_llama_state_dict(state, config), llama_config_dict(config, dtype_name),
                         max_shard_bytes)
        return
    config_dict = config.to_hf_dict(dtype_name)
    if "score_head.weight" in state:
        config_dict["architectures"] = ["InternLM2ForScore"]
    write_checkpoint(path, state, config_dict, max_shard_bytes)
