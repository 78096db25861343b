"""Training configuration: dataclasses loaded from TOML (``configs/*.toml``) with ``--section.key=value`` overrides.

Every key is checked: an unknown key, a value of the wrong type, or an inconsistent setting raises ``ConfigError``
(a ValueError) naming the key and the file. Overrides are parsed as TOML values (``--optim.lr=1e-3``,
``--eval.passkey_lengths=[256,512]``, ``--run.name=x``; a bare word is a string), and index into lists of tables
with a number (``--stages.1.steps=40``).
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

# train/ runs from the checkout: the repository root holds configs/ (and the packages train/ and models/).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_config(name: str) -> str:
    """The path of ``configs/<name>`` in this checkout (the default config of a stage)."""
    return os.path.join(REPO_ROOT, "configs", name)


# model.gradient_checkpointing values -> the model's `gradient_checkpointing` attribute
CHECKPOINTING = {"none": False, "full": True, "mlp": "mlp"}


class ConfigError(ValueError):
    """A configuration key, value or path is wrong."""


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"           # the run writes to output_dir/name
    seed: int = 0
    device: str = "auto"               # auto (cuda if available) | cpu | cuda
    dtype: str = "auto"                # auto (bfloat16 on cuda, float32 on cpu) | float32 | bfloat16
    threads: int = 0                   # torch CPU threads; 0 = leave torch's default
    stop_at_step: int = 0              # end (with a checkpoint) after this global step, e.g. for time-sliced jobs;
                                       # --resume continues; 0 = run all stages


@dataclass
class ModelConfig:
    preset: str = "tiny"               # InternLM2Config.preset name
    init_from: str = ""                # optional HF-layout directory to start from instead of random init
    gradient_checkpointing: str = "none"   # none | full (recompute each block) | mlp (recompute the SwiGLU output)
    compile: bool = False              # torch.compile the model's forward (nn.Module.compile; weights unchanged)
    overrides: dict[str, Any] = field(default_factory=dict)  # any InternLM2Config field, e.g. hidden_size


@dataclass
class DataConfig:
    source: str = "synthetic"          # synthetic (the embedded corpus) | files
    paths: list[str] = field(default_factory=list)        # txt/jsonl/parquet files, directories or globs
    text_field: str = "text"           # jsonl key / parquet column
    txt_mode: str = "line"             # line (one document per line) | file (one document per file)
    tokenizer: str = "byte"            # byte | path to a SentencePiece tokenizer.model
    byte_vocab_size: int = 272         # vocabulary of the byte tokenizer (>= 92544 puts specials at real ids)
    document_boundaries: bool = True   # per-document attention (cu_seqlens); False packs without boundaries
    packing: str = "cut"               # cut (remainders start the next row) | fit (rows never cut a document)
    heldout_docs: int = 200            # held-out documents for perplexity (files: the first N are reserved)
    num_people: int = 24               # synthetic: size of the world of facts


@dataclass
class StageConfig:
    name: str = "pretrain"
    steps: int = 100
    seq_len: int = 4096                # tokens per packed row (the context length of the stage)
    global_batch_tokens: int = 0       # tokens per optimizer step over all ranks; 0 = one row per rank
    micro_batch_tokens: int = 0        # tokens per forward/backward on one rank; 0 = seq_len
    rope_theta: float = 0.0            # RoPE base for this stage; 0 = the model's
    mix: dict[str, float] = field(default_factory=dict)     # synthetic task weights (train.data.corpus.TASKS)
    passkey_min_chars: int = 200       # synthetic passkey documents: length range in characters
    passkey_max_chars: int = 1000
    induction_min_chars: int = 8       # synthetic induction rows: span length range in characters
    induction_max_chars: int = 64


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0             # max global grad norm; 0 disables clipping
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1          # cosine floor as a fraction of lr


@dataclass
class CheckpointConfig:
    every: int = 0                     # save every N optimizer steps; 0 = at the end of each stage only
    keep_last: int = 2
    resume: bool = False               # continue from the newest checkpoint in the run directory


@dataclass
class EvalConfig:
    heldout: bool = True               # held-out perplexity before training and after each stage
    heldout_seq_len: int = 0           # 0 = first stage's seq_len
    passkey: bool = True               # needle-in-a-haystack probe after the last stage
    passkey_lengths: list[int] = field(default_factory=lambda: [256, 512, 1024])
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = 4            # prompts per (length, depth) cell
    batch_tokens: int = 8192           # tokens per evaluation forward


@dataclass
class MetricsConfig:
    log_every: int = 1                 # JSONL line every N steps
    progress: bool = True              # tqdm progress bar on the console
    plots: bool = True                 # PNG plots at the end
    peak_tflops: float = 0.0           # accelerator peak for MFU; 0 = look up the GPU name


@dataclass
class ParallelConfig:
    mode: str = "ddp"                  # how the model spreads over the ranks: train.parallel.MODES (ddp)
    shard_size: int = 0                # data-parallel ranks a sharded state spans (ZeRO/FSDP modes); 0 = all
    tp: int = 1                        # tensor-parallel degree (modes ddp, fsdp): consecutive ranks, world / tp
                                       # data-parallel groups
    overlap: bool = True               # overlap gradient communication with the backward pass


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.run.output_dir, self.run.name)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


# ---------------------------------------------------------------------------------------------------------------
# Building dataclasses from nested dicts, with type checks


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp, where: str):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {_type_name(item)}, got {value!r}")
        return [_convert(v, item, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return {k: _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise AssertionError("union-typed config fields are not used")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {tp}")


def _build(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(names)})")
    return cls(**{k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()})


def _to_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_dict(v) for k, v in obj.items()}
    return obj


def to_dict(config: TrainConfig) -> dict:
    return _to_dict(config)


def parse_value(text: str):
    """A CLI value as TOML (numbers, booleans, lists, quoted strings); anything else is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict, dotted: str, value) -> None:
    """Set ``data[a][b]...`` for ``dotted = "a.b..."``; a numeric part indexes a list (of stages)."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"override --{dotted}: empty key part")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        path = ".".join(parts[:i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override --{dotted}: {path} must index one of the {len(node)} entries")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override --{dotted}: {path} is a value, not a table")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override --{dotted}: index {last} out of range ({len(node)} entries)")
        node[int(last)] = value
    else:
        node[last] = value


def read_toml(path: str) -> dict:
    """A config file's tables, or ConfigError naming the file when it is missing or not TOML."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None, cls: type = TrainConfig):
    """Defaults <- the TOML file <- overrides (``{"optim.lr": 1e-3}``), then validated. ``cls``: TrainConfig or a
    stage's subclass of it with extra sections (train.stages.align_config)."""
    data = read_toml(path) if path else {}
    where = path or "config"
    if "stages" in data and not isinstance(data["stages"], list):
        raise ConfigError(f"{where}: stages must be an array of tables ([[stages]])")
    if overrides:
        data.setdefault("stages", [{}] if not data.get("stages") else data["stages"])
        for key, value in overrides.items():
            apply_override(data, key, value)
    try:
        config = _build(cls, data, "")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    try:
        validate(config)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return config


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(c: TrainConfig) -> None:
    """Value and consistency checks that do not need the model or the world size."""
    _check(bool(c.run.name) and "/" not in c.run.name, f"run.name must be a non-empty name without '/', got {c.run.name!r}")
    _check(c.run.device in ("auto", "cpu", "cuda"), f"run.device must be auto, cpu or cuda, got {c.run.device!r}")
    _check(c.run.dtype in ("auto", "float32", "bfloat16"),
           f"run.dtype must be auto, float32 or bfloat16, got {c.run.dtype!r}")
    _check(c.run.threads >= 0, f"run.threads must be >= 0, got {c.run.threads}")
    _check(c.run.stop_at_step >= 0, f"run.stop_at_step must be >= 0, got {c.run.stop_at_step}")
    check_model(c.model)
    _check(c.model.gradient_checkpointing in CHECKPOINTING,
           f"model.gradient_checkpointing must be one of {', '.join(CHECKPOINTING)}, got {c.model.gradient_checkpointing!r}")
    if c.model.init_from:
        _check(os.path.isdir(c.model.init_from), f"model.init_from: directory {c.model.init_from!r} does not exist")
    _check(c.data.source in ("synthetic", "files"), f"data.source must be synthetic or files, got {c.data.source!r}")
    if c.data.source == "files":
        _check(bool(c.data.paths), "data.paths: data.source = 'files' needs at least one path")
        from train.data.packing import expand_paths
        try:
            expand_paths(c.data.paths)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _check(c.data.txt_mode in ("line", "file"), f"data.txt_mode must be line or file, got {c.data.txt_mode!r}")
    _check(bool(c.data.text_field), "data.text_field must be a non-empty field name")
    from train.data.tokenizer import MIN_BYTE_VOCAB
    _check(c.data.byte_vocab_size >= MIN_BYTE_VOCAB,
           f"data.byte_vocab_size must be >= {MIN_BYTE_VOCAB} (bytes + specials), got {c.data.byte_vocab_size}")
    _check(c.data.num_people >= 1, f"data.num_people must be >= 1, got {c.data.num_people}")
    if c.data.tokenizer != "byte":
        tok = c.data.tokenizer
        tok_file = os.path.join(tok, "tokenizer.model") if os.path.isdir(tok) else tok
        _check(os.path.isfile(tok_file), f"data.tokenizer: {tok_file!r} does not exist (use 'byte' for the built-in one)")
    from train.data.packing import PACKINGS
    _check(c.data.packing in PACKINGS, f"data.packing must be one of {', '.join(PACKINGS)}, got {c.data.packing!r}")
    _check(c.data.heldout_docs >= 0, f"data.heldout_docs must be >= 0, got {c.data.heldout_docs}")
    _check(len(c.stages) >= 1, "stages: at least one [[stages]] table is needed")
    names = set()
    for i, s in enumerate(c.stages):
        w = f"stages.{i}"
        _check(bool(s.name), f"{w}.name must be a non-empty name")
        _check(s.name not in names, f"{w}.name {s.name!r} is used twice")
        names.add(s.name)
        _check(s.steps >= 1, f"{w}.steps must be >= 1, got {s.steps}")
        _check(s.seq_len >= 2, f"{w}.seq_len must be >= 2, got {s.seq_len}")
        _check(s.global_batch_tokens >= 0, f"{w}.global_batch_tokens must be >= 0, got {s.global_batch_tokens}")
        _check(s.micro_batch_tokens >= 0, f"{w}.micro_batch_tokens must be >= 0, got {s.micro_batch_tokens}")
        micro = s.micro_batch_tokens or s.seq_len
        _check(micro % s.seq_len == 0, f"{w}.micro_batch_tokens ({micro}) must be a multiple of seq_len ({s.seq_len})")
        if s.global_batch_tokens:
            _check(s.global_batch_tokens % micro == 0,
                   f"{w}.global_batch_tokens ({s.global_batch_tokens}) must be a multiple of micro_batch_tokens ({micro})")
        _check(s.rope_theta >= 0, f"{w}.rope_theta must be >= 0, got {s.rope_theta}")
        _check(0 < s.passkey_min_chars <= s.passkey_max_chars,
               f"{w}: need 0 < passkey_min_chars <= passkey_max_chars, got {s.passkey_min_chars}, {s.passkey_max_chars}")
        _check(0 < s.induction_min_chars <= s.induction_max_chars,
               f"{w}: need 0 < induction_min_chars <= induction_max_chars, got {s.induction_min_chars}, "
               f"{s.induction_max_chars}")
        if s.mix:
            from train.data.corpus import TASKS
            for task, weight in s.mix.items():
                _check(task in TASKS, f"{w}.mix: unknown task {task!r} (tasks: {', '.join(TASKS)})")
                _check(weight >= 0, f"{w}.mix.{task} must be >= 0, got {weight}")
            _check(sum(s.mix.values()) > 0, f"{w}.mix: at least one task needs a positive weight")
    o = c.optim
    _check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    _check(o.eps >= 0 and o.weight_decay >= 0, "optim.eps and optim.weight_decay must be >= 0")
    _check(o.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {o.grad_clip}")
    _check(0 <= o.warmup_steps <= c.total_steps,
           f"optim.warmup_steps must be in [0, {c.total_steps}] (the total steps), got {o.warmup_steps}")
    _check(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    _check(c.checkpoint.every >= 0, f"checkpoint.every must be >= 0, got {c.checkpoint.every}")
    _check(c.checkpoint.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {c.checkpoint.keep_last}")
    e = c.eval
    _check(e.heldout_seq_len >= 0, f"eval.heldout_seq_len must be >= 0, got {e.heldout_seq_len}")
    _check(bool(e.passkey_lengths) and all(n > 0 for n in e.passkey_lengths),
           f"eval.passkey_lengths must be positive token counts, got {e.passkey_lengths}")
    _check(all(0 <= d <= 1 for d in e.passkey_depths), f"eval.passkey_depths must be in [0, 1], got {e.passkey_depths}")
    _check(e.passkey_trials >= 1, f"eval.passkey_trials must be >= 1, got {e.passkey_trials}")
    _check(e.batch_tokens >= 64, f"eval.batch_tokens must be >= 64, got {e.batch_tokens}")
    _check(c.metrics.log_every >= 1, f"metrics.log_every must be >= 1, got {c.metrics.log_every}")
    _check(c.metrics.peak_tflops >= 0, f"metrics.peak_tflops must be >= 0, got {c.metrics.peak_tflops}")
    check_parallel(c.parallel)


def check_model(m: ModelConfig) -> None:
    """The preset exists, every override is an InternLM2Config field, and the result is a valid config."""
    import dataclasses as dc

    from models import InternLM2Config
    from models.config import PRESETS

    _check(m.preset in PRESETS, f"model.preset must be one of {', '.join(PRESETS)}, got {m.preset!r}")
    fields = {f.name for f in dc.fields(InternLM2Config)}
    for key in m.overrides:
        _check(key in fields, f"model.overrides: {key!r} is not an InternLM2Config field ({', '.join(sorted(fields))})")
    try:
        dc.replace(InternLM2Config.preset(m.preset), **m.overrides)
    except (TypeError, ValueError, NotImplementedError) as e:
        raise ConfigError(f"model.overrides: {e}") from None


def check_parallel(p: ParallelConfig) -> None:
    from train.parallel import MODES

    _check(p.mode in MODES, f"parallel.mode must be one of {', '.join(MODES)}, got {p.mode!r}")
    _check(p.tp >= 1, f"parallel.tp must be >= 1, got {p.tp}")
    _check(p.shard_size >= 0, f"parallel.shard_size must be >= 0, got {p.shard_size}")
    try:
        MODES[p.mode].check_config(p)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def parse_args(argv: list[str], default_config: str | None, resume_key: str) -> tuple[str | None, dict[str, Any]]:
    """The one command line of every stage: ``[--config PATH] [--resume] [--section.key=value | --section.key
    value ...]`` -> (config path, {dotted key: value}); ``--resume`` sets ``resume_key`` (the stage's own key)."""
    path = default_config
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r} (options look like --config PATH or --section.key=value)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if key == "resume":
                overrides[resume_key] = True
                i += 1
                continue
            if i + 1 >= len(argv):
                raise ConfigError(f"option --{key} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "config":
            path = value
        else:
            overrides[resume_key if key == "resume" else key] = parse_value(value)
    return path, overrides


def parse_cli(argv: list[str], default_config: str | None = None, cls: type = TrainConfig):
    """``parse_args`` then ``load_config`` (``--resume``: checkpoint.resume)."""
    path, overrides = parse_args(argv, default_config, "checkpoint.resume")
    return load_config(path, overrides, cls)
