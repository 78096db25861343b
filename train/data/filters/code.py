"""Code: the files of one repository ordered by their imports and joined into one document per repository.

InternLM2 (report §3.1.2) trains on repository-level code: files are concatenated so that a file comes after the
files it depends on, giving the model the definitions before their uses. Dependencies are read from import
statements (regular expressions, so a file that does not parse still gets its edges):

- Python: ``import a.b`` / ``from a.b import c`` (absolute: the module ``a/b.py`` or package ``a/b/__init__.py``
  of the repository, or the module ``a/b/c.py`` for ``from a.b import c``) and relative imports (``from .m import
  x``, ``from .. import m``) resolved against the importer's package. A package's ``__init__.py`` is not an
  implicit dependency of its submodules (it usually imports them, which would make every package a cycle).
- JavaScript: ``import ... from './x'``, ``import './x'``, ``export ... from './x'``, ``require('./x')`` with
  relative specifiers, tried as given, with ``.js``/``.mjs``/``.cjs`` and as ``x/index.js``.

Imports that do not resolve to a file of the repository (the standard library, packages) are ignored. The order is
Kahn's topological sort taking the smallest path among the ready files, so it is deterministic; files left in an
import cycle follow in path order. The joined document is the files in that order, each between ``header`` and
``footer`` lines naming its path.
"""
from __future__ import annotations

import heapq
import os
import posixpath
import re
import zlib
from collections import defaultdict

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers.jsonl import JsonlReader
from datatrove.pipeline.writers.jsonl import JsonlWriter

from train.data.filters.steps import Tally

EXTENSIONS = {"python": (".py",), "javascript": (".js", ".mjs", ".cjs")}

_PY_IMPORT = re.compile(r"^[ \t]*import[ \t]+([\w.]+(?:[ \t]*,[ \t]*[\w.]+)*)", re.M)
_PY_FROM = re.compile(r"^[ \t]*from[ \t]+(\.*)([\w.]*)[ \t]+import[ \t]+\(?([\w., \t]+)", re.M)
_JS_SPEC = re.compile(r"""(?:\bfrom|\bimport|\brequire[ \t]*\()[ \t]*['"](\.{1,2}/[^'"]+)['"]""")


def code_language(path: str, languages=("python", "javascript")) -> str | None:
    for lang in languages:
        if path.endswith(EXTENSIONS[lang]):
            return lang
    return None


def _py_module_file(module: str, files: set[str]) -> str | None:
    base = module.replace(".", "/")
    for cand in (base + ".py", base + "/__init__.py"):
        if cand in files:
            return cand
    return None


def python_imports(path: str, source: str, files: set[str]) -> set[str]:
    package = posixpath.dirname(path)

    def own_package_init(f: str) -> bool:  # the __init__ of the importer's package or of a package above it
        d = posixpath.dirname(f)
        return f.endswith("__init__.py") and (package == d or package.startswith(d + "/") or not d)

    found = set()
    for m in _PY_IMPORT.finditer(source):
        for name in m.group(1).split(","):
            name = name.strip()
            # "import a.b.c" also imports a and a.b; the deepest file that exists is the dependency
            while name:
                f = _py_module_file(name, files)
                if f:
                    if not own_package_init(f):
                        found.add(f)
                    break
                name = name.rpartition(".")[0]
    for m in _PY_FROM.finditer(source):
        dots, module, names = m.group(1), m.group(2), m.group(3)
        if dots:  # relative: one dot is the importer's package, each further dot one package up
            base = package
            for _ in range(len(dots) - 1):
                base = posixpath.dirname(base)
            module = ".".join(p for p in (base.replace("/", "."), module) if p)
        subs = {_py_module_file(f"{module}.{n}" if module else n, files)
                for n in (x.strip().split(" ")[0] for x in names.split(",")) if n} - {None}
        if subs:    # "from pkg import mod": the submodules are the dependencies
            found |= subs
            continue
        f = _py_module_file(module, files) if module else None
        if f and not own_package_init(f):
            found.add(f)
    found.discard(path)
    return found


def javascript_imports(path: str, source: str, files: set[str]) -> set[str]:
    found = set()
    here = posixpath.dirname(path)
    for spec in _JS_SPEC.findall(source):
        target = posixpath.normpath(posixpath.join(here, spec))
        for cand in (target, target + ".js", target + ".mjs", target + ".cjs", target + "/index.js"):
            if cand in files:
                found.add(cand)
                break
    found.discard(path)
    return found


def dependency_order(sources: dict[str, str], languages=("python", "javascript")) -> list[str]:
    """The paths of ``sources`` (path -> text) so that every file comes after the repository files it imports
    (when the imports have no cycle)."""
    files = set(sources)
    deps: dict[str, set[str]] = {}
    for path, text in sources.items():
        lang = code_language(path, languages)
        if lang == "python":
            deps[path] = python_imports(path, text, files)
        elif lang == "javascript":
            deps[path] = javascript_imports(path, text, files)
        else:
            deps[path] = set()
    users = defaultdict(set)
    for path, ds in deps.items():
        for d in ds:
            users[d].add(path)
    missing = {p: len(ds) for p, ds in deps.items()}
    ready = [p for p, n in missing.items() if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        p = heapq.heappop(ready)
        order.append(p)
        for u in users[p]:
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, u)
    done = set(order)
    order.extend(sorted(p for p in files if p not in done))   # import cycles: path order
    return order


def is_code(doc: Document, languages=("python", "javascript")) -> bool:
    md = doc.metadata
    return bool(md.get("repo")) and isinstance(md.get("path"), str) and code_language(md["path"], languages) is not None


def repo_shard(repo: str, shards: int) -> int:
    """A stable shard of a repository name (not Python's salted hash)."""
    return zlib.crc32(repo.encode("utf-8")) % shards


class CodeRouter(PipelineStep):
    """End of the filter stage: code files go to ``work/code/<repo shard>/<rank>.jsonl.gz`` (all files of a
    repository land in one shard, whichever task read them), everything else continues."""

    name = "🧭 code router"

    def __init__(self, work_dir: str, shards: int, languages):
        super().__init__()
        self.work_dir = work_dir
        self.shards = shards
        self.languages = tuple(languages)

    def run(self, data, rank: int = 0, world_size: int = 1):
        writer = JsonlWriter(os.path.join(self.work_dir, "code"), output_filename="${shard}/${rank}.jsonl.gz",
                             compression="gzip")
        with writer:
            for doc in data:
                if is_code(doc, self.languages):
                    doc.metadata["shard"] = f"{repo_shard(doc.metadata['repo'], self.shards):05d}"
                    self.stat_update("code_files")
                    writer.write(doc, rank)
                else:
                    yield doc


class RepoJoiner(PipelineStep):
    """The join stage: task r reads shard r of the routed code files, and writes one document per repository."""

    name = "🧩 repository join"

    def __init__(self, work_dir: str, out_dir: str, languages, header: str, footer: str):
        super().__init__()
        self.work_dir = work_dir
        self.out_dir = out_dir
        self.languages = tuple(languages)
        self.header = header
        self.footer = footer

    def join(self, repo: str, files: list[Document]) -> Document:
        by_path = {d.metadata["path"]: d for d in files}
        order = dependency_order({p: d.text for p, d in by_path.items()}, self.languages)
        parts = [f"{self.header.format(path=p)}\n{by_path[p].text}\n{self.footer}" for p in order]
        kinds = {d.metadata.get("kind") for d in files} - {None}
        metadata = {"repo": repo, "files": order, "n_inputs": sum(int(d.metadata.get("n_inputs", 1)) for d in files),
                    "language": "code", "source_ids": [by_path[p].id for p in order]}
        if len(kinds) == 1:
            metadata["kind"] = kinds.pop()
        return Document(text="\n".join(parts), id=f"repo:{repo}", metadata=metadata)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        tally = Tally()
        folder = os.path.join(self.work_dir, "code", f"{rank:05d}")
        repos: dict[str, list[Document]] = defaultdict(list)
        if os.path.isdir(folder):
            for doc in JsonlReader(folder, glob_pattern="*.jsonl.gz").run(rank=0, world_size=1):
                tally.seen(doc)
                repos[doc.metadata["repo"]].append(doc)
        writer = JsonlWriter(os.path.join(self.work_dir, "docs", "code"), output_filename="${rank}.jsonl.gz",
                             compression="gzip")
        with writer:
            for repo in sorted(repos):
                doc = self.join(repo, repos[repo])
                tally.passed(doc)
                writer.write(doc, rank)
        tally.save(self.out_dir, "code_join", rank)
        return iter(())
