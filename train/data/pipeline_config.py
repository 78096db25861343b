"""Configuration of the pretraining data pipeline (train.data.pipeline): one dataclass per TOML section.

Every threshold of every step lives here with the value the shipped configs/data_pipeline.toml starts from; the
TOML overrides any of them. Unknown sections or keys, and values of the wrong type, raise ValueError naming the key.
Paths that are relative are relative to the repository root (so ``make data`` works from any directory).
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from train.config import REPO_ROOT

SEED_DIR = os.path.join("train", "data", "seed")


@dataclass
class RunSection:
    executor: str = "local"            # local | ray
    tasks: int = 2                     # tasks of the parallel stages (files are sharded over them)
    workers: int = 1                   # tasks running at once (local: processes; 1 = in this process)
    ray_address: str = ""              # "" = ray.init() on this machine; else a cluster address (ray://host:10001)


@dataclass
class NormaliseSection:
    form: str = "NFKC"                 # unicodedata normal form
    collapse_spaces: bool = True       # runs of spaces/tabs inside a line -> one space (leading indentation kept)
    max_blank_lines: int = 1           # longer runs of empty lines are cut to this many


@dataclass
class LanguageSection:
    """Script-ratio language ID: letters are counted by script; Han/(Han+Latin) >= zh_min_han -> zh,
    Latin/(all letters) >= en_min_latin -> en, else "other". No model, no download."""
    keep: list[str] = field(default_factory=lambda: ["en", "zh"])
    zh_min_han: float = 0.3
    en_min_latin: float = 0.8
    min_letters: int = 20              # fewer letters than this: language "unknown" (removed unless kept)


@dataclass
class UrlSection:
    datatrove_list: bool = True        # datatrove's shipped blocklist (4.5M domains, ~20k URLs, banned URL words)
    extra_domains: str = os.path.join(SEED_DIR, "blocked_domains.txt")   # ours, one domain a line
    soft_word_threshold: int = 2       # URLs with this many soft-banned words are removed (datatrove's rule)


@dataclass
class WordListSection:
    """A document is removed when its blocked-term hits per 1,000 characters reach ``max_hits_per_kchar`` and it has
    at least ``min_hits`` hits (one stray word in a long article does not remove it)."""
    files: dict[str, str] = field(default_factory=lambda: {
        "en": os.path.join(SEED_DIR, "blocked_words_en.txt"),
        "zh": os.path.join(SEED_DIR, "blocked_words_zh.txt")})
    min_hits: int = 3
    max_hits_per_kchar: float = 2.0


@dataclass
class ClassifierSection:
    """A fastText classifier trained at the start of the run on the shipped seed file (``__label__X text`` lines);
    a document is removed when P(remove_label) >= threshold."""
    seed: str = ""
    remove_label: str = ""
    threshold: float = 0.9
    epoch: int = 100                   # a few hundred seed lines: many epochs at a high rate
    lr: float = 1.0
    word_ngrams: int = 2
    dim: int = 32
    bucket: int = 100000               # hashed n-gram rows (fastText's 2M default makes a 256 MB model)
    minn: int = 2                      # character n-grams: they make the model work on Chinese without segmentation
    maxn: int = 4


@dataclass
class GopherRepetitionSection:
    languages: list[str] = field(default_factory=lambda: ["en", "zh"])
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: list[list[float]] = field(default_factory=lambda: [[2, 0.2], [3, 0.18], [4, 0.16]])
    dup_n_grams: list[list[float]] = field(default_factory=lambda: [[5, 0.15], [6, 0.14], [7, 0.13], [8, 0.12],
                                                                   [9, 0.11], [10, 0.10]])
    overrides: dict[str, dict] = field(default_factory=dict)   # per language: {zh = {key = value}}


@dataclass
class GopherQualitySection:
    languages: list[str] = field(default_factory=lambda: ["en"])
    min_doc_words: int = 50
    max_doc_words: int = 100000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    max_non_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    overrides: dict[str, dict] = field(default_factory=dict)   # per language: {zh = {key = value}}


@dataclass
class C4Section:
    languages: list[str] = field(default_factory=lambda: ["en"])
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True
    overrides: dict[str, dict] = field(default_factory=dict)   # per language: {zh = {key = value}}


@dataclass
class FineWebSection:
    languages: list[str] = field(default_factory=lambda: ["en", "zh"])
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3
    overrides: dict[str, dict] = field(default_factory=dict)   # per language: {zh = {key = value}}


@dataclass
class CodeSection:
    languages: list[str] = field(default_factory=lambda: ["python", "javascript"])
    join_tasks: int = 1                # tasks of the repository-join stage (repositories are hashed over them)
    header: str = "<file path=\"{path}\">"   # written before each file of a joined repository
    footer: str = "</file>"


@dataclass
class DedupSection:
    exact: bool = True
    minhash: bool = True
    n_grams: int = 5
    num_buckets: int = 20
    hashes_per_bucket: int = 5


@dataclass
class LongContextSection:
    enabled: bool = True
    min_chars: int = 2000              # documents at least this long are candidates
    checkpoint: str = ""               # a models/ checkpoint directory; "" = no perplexity scoring (stat says so)
    tokenizer: str = "byte"            # train.data.tokenizer spec of that checkpoint
    max_tokens: int = 2048             # perplexity over the first max_tokens tokens of a document
    max_perplexity: float = 0.0        # 0 = keep every candidate (scores still written); else keep ppl <= this


@dataclass
class PipelineConfig:
    run: RunSection = field(default_factory=RunSection)
    normalise: NormaliseSection = field(default_factory=NormaliseSection)
    language: LanguageSection = field(default_factory=LanguageSection)
    url: UrlSection = field(default_factory=UrlSection)
    wordlist: WordListSection = field(default_factory=WordListSection)
    safety_classifier: ClassifierSection = field(default_factory=lambda: ClassifierSection(
        seed=os.path.join(SEED_DIR, "safety_seed.txt"), remove_label="unsafe", threshold=0.9))
    gopher_repetition: GopherRepetitionSection = field(default_factory=GopherRepetitionSection)
    gopher_quality: GopherQualitySection = field(default_factory=GopherQualitySection)
    c4_quality: C4Section = field(default_factory=C4Section)
    fineweb_quality: FineWebSection = field(default_factory=FineWebSection)
    quality_classifier: ClassifierSection = field(default_factory=lambda: ClassifierSection(
        seed=os.path.join(SEED_DIR, "quality_seed.txt"), remove_label="low", threshold=0.9))
    code: CodeSection = field(default_factory=CodeSection)
    dedup: DedupSection = field(default_factory=DedupSection)
    long_context: LongContextSection = field(default_factory=LongContextSection)


LANGUAGE_SECTIONS = ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")


def for_language(section, lang: str):
    """``section`` with its ``overrides[lang]`` applied."""
    return dataclasses.replace(section, **section.overrides.get(lang, {}))


def repo_path(path: str) -> str:
    """``path`` as given when absolute, else relative to the repository root."""
    return path if not path or os.path.isabs(path) else os.path.join(REPO_ROOT, path)


def _merge(base, data: dict, where: str):
    """``base`` (a section dataclass) with the keys of ``data`` replaced, each checked against the default's type."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a table, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(base)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ValueError(f"{where}.{key}: unknown key (known: {', '.join(names)})")
        default = getattr(base, key)
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            ok = isinstance(value, type(default))
        else:  # an int field takes ints, a float field ints or floats
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                isinstance(default, float) or isinstance(value, int))
        if not ok:
            raise ValueError(f"{where}.{key}: expected {type(default).__name__}, got {value!r}")
        kwargs[key] = value
    return dataclasses.replace(base, **kwargs)


def load_pipeline_config(path: str | None = None) -> PipelineConfig:
    """The defaults, overridden by the TOML file at ``path`` (None: the defaults alone)."""
    cfg = PipelineConfig()
    if not path:
        return validate(cfg)
    if not os.path.isfile(path):
        raise ValueError(f"--config: {path!r} does not exist")
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config: {path}: {e}") from e
    sections = {f.name for f in dataclasses.fields(PipelineConfig)}
    for name, value in data.items():
        if name not in sections:
            raise ValueError(f"{name}: unknown section (known: {', '.join(sorted(sections))})")
        setattr(cfg, name, _merge(getattr(cfg, name), value, name))
    return validate(cfg)


def validate(cfg: PipelineConfig) -> PipelineConfig:
    def check(ok: bool, msg: str):
        if not ok:
            raise ValueError(msg)

    check(cfg.run.executor in ("local", "ray"), f"run.executor must be local or ray, got {cfg.run.executor!r}")
    check(cfg.run.tasks >= 1, f"run.tasks must be >= 1, got {cfg.run.tasks}")
    check(cfg.run.workers >= 1, f"run.workers must be >= 1, got {cfg.run.workers}")
    check(cfg.normalise.form in ("NFC", "NFKC", "NFD", "NFKD"), f"normalise.form: bad form {cfg.normalise.form!r}")
    check(set(cfg.language.keep) <= {"en", "zh", "other", "unknown"},
          f"language.keep: values are en, zh, other, unknown; got {cfg.language.keep}")
    for name in ("safety_classifier", "quality_classifier"):
        c: ClassifierSection = getattr(cfg, name)
        check(os.path.isfile(repo_path(c.seed)), f"{name}.seed: {c.seed!r} does not exist")
        check(0.0 < c.threshold <= 1.0, f"{name}.threshold must be in (0, 1], got {c.threshold}")
    for lang, path in cfg.wordlist.files.items():
        check(os.path.isfile(repo_path(path)), f"wordlist.files.{lang}: {path!r} does not exist")
    check(not cfg.url.extra_domains or os.path.isfile(repo_path(cfg.url.extra_domains)),
          f"url.extra_domains: {cfg.url.extra_domains!r} does not exist")
    check(cfg.code.join_tasks >= 1, f"code.join_tasks must be >= 1, got {cfg.code.join_tasks}")
    check(set(cfg.code.languages) <= {"python", "javascript"},
          f"code.languages: supported are python, javascript; got {cfg.code.languages}")
    check(cfg.dedup.num_buckets >= 1 and cfg.dedup.hashes_per_bucket >= 1 and cfg.dedup.n_grams >= 1,
          "dedup.num_buckets, dedup.hashes_per_bucket and dedup.n_grams must be >= 1")
    for name in LANGUAGE_SECTIONS:
        section = getattr(cfg, name)
        for lang, over in section.overrides.items():
            check(isinstance(over, dict) and "overrides" not in over, f"{name}.overrides.{lang}: expected a table")
            _merge(section, over, f"{name}.overrides.{lang}")
    lc = cfg.long_context
    check(lc.min_chars >= 1, f"long_context.min_chars must be >= 1, got {lc.min_chars}")
    check(not lc.checkpoint or os.path.isdir(repo_path(lc.checkpoint)),
          f"long_context.checkpoint: {lc.checkpoint!r} is not a directory")
    check(lc.max_tokens >= 2, f"long_context.max_tokens must be >= 2, got {lc.max_tokens}")
    return cfg
