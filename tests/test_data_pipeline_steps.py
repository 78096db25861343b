"""The data pipeline's own steps (train.data.filters) on hand-made documents, without an executor: each removes
what it should (positives) and keeps what it should (negatives). End-to-end runs: test_data_pipeline_run.py."""
from __future__ import annotations

import gzip
import json
import math
import os

import pytest

pytest.importorskip("datatrove")

from datatrove.data import Document  # noqa: E402

from train.data.filters.classifier import classifier_filter, train_classifier  # noqa: E402
from train.data.filters.code import dependency_order, javascript_imports, python_imports  # noqa: E402
from train.data.filters.language import script_language  # noqa: E402
from train.data.filters.normalise import Normaliser, normalise_text  # noqa: E402
from train.data.filters.reader import InputReader  # noqa: E402
from train.data.filters.safety import OfflineURLFilter, WordListFilter, read_terms  # noqa: E402
from train.data.packing import read_file  # noqa: E402
from train.data.pipeline import filter_stage  # noqa: E402
from train.data.pipeline_config import load_pipeline_config, repo_path  # noqa: E402

CONFIG = repo_path("configs/data_pipeline.toml")

API_DOC = """torch.cumsum(input, dim, *, dtype=None, out=None) -> Tensor

Returns the cumulative sum of elements of input in the dimension dim. For example, if input is a vector of size N,
the result will also be a vector of size N, with elements y_i = x_1 + x_2 + ... + x_i.

Parameters
    input (Tensor): the input tensor.
    dim (int): the dimension to do the operation over.

Keyword Arguments
    dtype (torch.dtype, optional): the desired data type of the returned tensor. If specified, the input tensor is
    cast to dtype before the operation is performed. This is useful for preventing data type overflows.

Example:

    >>> a = torch.randint(1, 20, (10,))
    >>> torch.cumsum(a, dim=0)
    tensor([13, 20, 23, 33, 46, 49, 64, 74, 83, 93])
    >>> {k: v for k, v in zip("ab", (1, 2))}

Note that the sum is computed sequentially on CPU, so the result of a float cumulative sum can differ from a
pairwise reduction in the last bits. When reproducibility across devices matters, accumulate in float64 and cast
the result back to the original type at the end."""

ZH_DOC = """梯度下降是训练机器学习模型最常用的优化方法。它的基本思想是：沿着损失函数梯度的反方向更新参数。

学习率的选择非常重要。学习率过大，参数会在最优点附近来回震荡，甚至发散；学习率过小，收敛速度又会很慢。

自适应方法如 Adam 则为每个参数维护梯度一阶矩和二阶矩的估计，自动调整每个参数的步长。"""


def doc(text, **metadata):
    return Document(text=text, id="t", metadata=metadata)


# ------------------------------------------------------------------------------------------------- normalise
def test_normalise_nfkc_controls_whitespace():
    text = "ＡＢＣ１２３ ﬁle\u200b\x07 word\r\n\tindented   code\u00a0x  \n\n\n\nend  "
    assert normalise_text(text) == "ABC123 file word\n\tindented code x\n\nend"
    assert normalise_text("  def f():\n      return  1") == "  def f():\n      return 1"   # indentation kept
    assert normalise_text("\u200b\u200c\x00 \n") == ""
    code = Document(text='x  = "ａ  b"\r\n\n\n\ny = 2\u200b  ', id="c", metadata={"repo": "r", "path": "m.py"})
    Normaliser(is_code=lambda d: "repo" in d.metadata).filter(code)   # source files keep their spacing
    assert code.text == 'x  = "ａ  b"\n\n\ny = 2'


# -------------------------------------------------------------------------------------------------- language
@pytest.mark.parametrize("text,lang", [
    (API_DOC, "en"), (ZH_DOC, "zh"),
    ("在 Git 中，分支只是指向某个提交的可移动指针，因此创建分支几乎没有开销。使用 git switch 切换分支。", "zh"),
    ("Это пример текста на русском языке, который не английский и не китайский.", "other"),
    ("ok 12 34", "unknown"),
])
def test_script_language(text, lang):
    assert script_language(normalise_text(text)) == lang


# ------------------------------------------------------------------------------------------------ url, words
def test_url_filter_ours_and_missing_url():
    f = OfflineURLFilter(read_terms(repo_path("train/data/seed/blocked_domains.txt")), use_integrated_lists=False)
    assert f.filter(doc(API_DOC, url="https://docs.example.org/torch")) is True
    assert f.filter(doc(API_DOC)) is True                             # no url: nothing to check
    assert f.filter(doc(API_DOC, url="https://content-farm.example.net/a"))[0] is False
    assert f.filter(doc(API_DOC, url="https://www.seo-links.example.net/b"))[0] is False  # a host under it


def _wordlist():
    cfg = load_pipeline_config(CONFIG).wordlist
    return WordListFilter({k: read_terms(repo_path(p)) for k, p in cfg.files.items()}, cfg.min_hits,
                          cfg.max_hits_per_kchar)


def test_wordlist_dense_spam_removed_single_mention_kept():
    f = _wordlist()
    spam = "Buy viagra now! Cheap viagra and cialis, online pharmacy, no prescription. Click here, buy now. " * 2
    assert f.filter(doc(spam, language="en")) == (False, "blocked_words")
    article = API_DOC + "\nA spam filter is tested on mails that advertise viagra; that mention is not spam."
    assert f.filter(doc(article, language="en")) is True
    # whole words only in English: "xxx" inside an identifier, "porn" inside "scorn" do not count
    assert f.hits("the scorn of xxxlarge_buffer and sporno", "en") == 0
    zh_spam = "网上赌场真人娱乐，注册就送彩金，百家乐、老虎机应有尽有，点击这里免费领取现金红包。"
    assert f.filter(doc(zh_spam, language="zh")) == (False, "blocked_words")
    assert f.filter(doc(ZH_DOC, language="zh")) is True


# ----------------------------------------------------------------------------------------------- classifiers
@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    cfg = load_pipeline_config(CONFIG)
    out = tmp_path_factory.mktemp("models")
    made = {}
    for name in ("safety_classifier", "quality_classifier"):
        c = getattr(cfg, name)
        path = train_classifier(repo_path(c.seed), str(out / f"{name}.bin"), c.epoch, c.lr, c.word_ngrams, c.dim,
                                c.bucket, c.minn, c.maxn)
        made[name] = classifier_filter(path, c.remove_label, c.threshold)
    return made


def test_safety_classifier(classifiers):
    f = classifiers["safety_classifier"]
    unsafe = ("Lonely ladies near you want to chat tonight. Send a private message and get naughty photos now. "
              "Meet sexy local girls tonight in private chat rooms, adult dating, discreet encounters guaranteed.")
    assert f.filter(doc(unsafe)) is False
    assert f.filter(doc(API_DOC)) is True
    assert f.filter(doc(ZH_DOC)) is True


def test_quality_classifier(classifiers):
    f = classifiers["quality_classifier"]
    clickbait = ("You will not believe what happened next, number seven will shock you, click to see more. Top ten "
                 "amazing tricks doctors do not want you to know, you must see this. OMG best thing ever, must "
                 "watch, share with all your friends now. One weird trick, this simple trick will change your life.")
    assert f.filter(doc(clickbait)) is False
    assert f.filter(doc(API_DOC)) is True
    assert f.filter(doc(ZH_DOC)) is True


# ------------------------------------------------------------------------------------- tuned datatrove rules
def _quality_steps(cfg, tmp_path):
    steps = {s.step: s.filt for s in filter_stage(cfg, str(tmp_path), None, str(tmp_path),
                                                  {"safety_classifier": "-", "quality_classifier": "-"})[1:-2]}
    return [steps[n] for n in ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")]


def test_tuned_rules_keep_code_bearing_text_and_remove_junk(tmp_path):
    tuned = _quality_steps(load_pipeline_config(CONFIG), tmp_path)
    defaults = _quality_steps(load_pipeline_config(None), tmp_path)
    en = doc(API_DOC, language="en")
    assert all(f.filter(en) is True for f in tuned)
    # datatrove's defaults remove it: the alphabetic-word rule (punctuation tokens count as words) and C4's "{"
    assert any(f.filter(doc(API_DOC, language="en")) is not True for f in defaults)
    # the pipeline normalises first (NFKC turns Chinese full-width punctuation into ASCII, which datatrove's
    # Chinese word splitter cuts at)
    assert all(f.filter(doc(normalise_text(ZH_DOC), language="zh")) is True for f in tuned)
    junk = ["Home\nAbout\nProducts\nContact\nLogin\nRegister\nCart\nSearch\nPrivacy Policy\nTerms\n" * 3,
            "lol " * 200,
            "#### {{{{ }}}} [[[[ ]]]] 0x3F2A 0x19BC ==== ---- @@@@ &&&&\n" * 12,
            "We use cookies to improve your experience. Accept all cookies. Manage cookie preferences. " * 6]
    for text in junk:
        assert any(f.filter(doc(text, language="en")) is not True for f in tuned), text[:30]


# ---------------------------------------------------------------------------------------------------- code
def _edges(sources):
    files = set(sources)
    return {p: (python_imports(p, t, files) if p.endswith(".py") else javascript_imports(p, t, files))
            for p, t in sources.items()}


def test_code_order_imports_first():
    sources = {
        "pkg/__init__.py": "from .api import run\nfrom . import util\n",
        "pkg/api.py": "import os\nfrom pkg.core.engine import Engine\nfrom .util import helper\n",
        "pkg/util.py": "import json\n",
        "pkg/core/__init__.py": "",
        "pkg/core/engine.py": "from ..util import helper\nfrom . import plugins\n",
        "pkg/core/plugins.py": "import pkg.util\n",
        "main.py": "import pkg.api\nfrom pkg import util\n",
        "web/app.js": "import { a } from './lib/a.js';\nconst b = require('./lib/b');\nimport x from 'react';\n",
        "web/lib/a.js": "export * from './c';\n",
        "web/lib/b.js": "const c = require('./c/index.js');\n",
        "web/lib/c/index.js": "export const c = 1;\n",
    }
    edges = _edges(sources)
    assert edges["pkg/api.py"] == {"pkg/core/engine.py", "pkg/util.py"}        # os is not in the repository
    assert edges["pkg/core/engine.py"] == {"pkg/util.py", "pkg/core/plugins.py"}
    assert edges["web/app.js"] == {"web/lib/a.js", "web/lib/b.js"}              # react is not
    assert edges["web/lib/a.js"] == {"web/lib/c/index.js"}
    order = dependency_order(sources)
    assert sorted(order) == sorted(sources)
    pos = {p: i for i, p in enumerate(order)}
    for importer, deps in edges.items():
        for d in deps:
            assert pos[d] < pos[importer], (d, importer, order)


def test_code_order_cycle_keeps_every_file():
    sources = {"a.py": "import b\n", "b.py": "import a\n", "c.py": "import a\n", "d.py": ""}
    order = dependency_order(sources)
    assert order[0] == "d.py" and sorted(order) == ["a.py", "b.py", "c.py", "d.py"]


# --------------------------------------------------------------------------------------------------- reader
def test_reader_bad_input_counted_and_ids_stable(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "fine", "url": "u"}) + "\n" + '{"text": "cut\n'
                                      + json.dumps({"body": "x"}) + "\n" + json.dumps({"text": 3}) + "\n"
                                      + json.dumps({"text": "  "}) + "\n" + json.dumps({"id": 7, "text": "y"}) + "\n")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 9)[:30])
    (tmp_path / "c.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    (tmp_path / "d.parquet").write_bytes(b"not parquet")
    (tmp_path / "notes.md").write_text("hello")
    reader = InputReader(str(tmp_path))
    docs = [d for f in sorted(os.listdir(tmp_path)) for d in reader.read_file(f)]
    reasons = [d.metadata.get("bad_input") for d in docs]
    assert reasons == [None, "malformed_json", "missing_text", "text_not_string", "empty_text", None,
                       "undecodable_file", "undecodable_line", "undecodable_file", "unsupported_file"]
    assert [docs[0].id, docs[5].id] == ["a.jsonl/0", "7"] and docs[0].metadata["url"] == "u"
    assert [d.id for d in reader.read_file("a.jsonl")] == [d.id for d in docs[:6]]


def test_file_corpus_reads_jsonl_gz(tmp_path):
    path = tmp_path / "kept.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"text": "one", "id": "1", "metadata": {}}) + "\n" + json.dumps({"text": "两"}) + "\n")
    assert list(read_file(str(path))) == ["one", "两"]


# --------------------------------------------------------------------------------------------------- config
def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "c.toml"
    for text, key in [("[gopher_quality]\nmin_doc_wordz = 3\n", "gopher_quality.min_doc_wordz"),
                      ("[dedup]\nnum_buckets = 'x'\n", "dedup.num_buckets"),
                      ("[nonsense]\n", "nonsense"),
                      ("[gopher_repetition.overrides.zh]\ntop_n_gramz = []\n", "gopher_repetition.overrides.zh.top"),
                      ("[long_context]\ncheckpoint = '/no/such/dir'\n", "long_context.checkpoint")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            load_pipeline_config(str(bad))


# ---------------------------------------------------------------------------------------------- long context
def test_long_context_perplexity_with_a_real_checkpoint(tmp_path):
    import torch

    from models.checkpoint import save_model
    from models.config import InternLM2Config
    from models.internlm2 import InternLM2ForCausalLM
    from train.data.filters.long_context import LongContextSelector, PerplexityScorer

    torch.manual_seed(0)
    config = InternLM2Config.preset("tiny")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 64, 128, 1
    config.num_attention_heads, config.num_key_value_heads = 2, 1
    save_model(InternLM2ForCausalLM(config), tmp_path / "ckpt")
    scorer = PerplexityScorer(str(tmp_path / "ckpt"), "byte", 64)
    ppl = scorer("The quick brown fox jumps over the lazy dog. " * 4)
    # an untrained model is near uniform over its vocabulary: ppl within a factor of 2 of vocab_size
    assert math.isfinite(ppl) and config.vocab_size / 2 < ppl < config.vocab_size * 2
    docs = [Document(text="short", id="s", metadata={}), Document(text="long text " * 30, id="l", metadata={}),
            Document(text="more long text " * 30, id="m", metadata={})]
    LongContextSelector(str(tmp_path / "out"), 100, scorer, max_perplexity=ppl * 10).run(iter(docs))
    with gzip.open(tmp_path / "out" / "long_context" / "00000.jsonl.gz", "rt") as f:
        picked = [json.loads(line) for line in f]
    assert [r["id"] for r in picked] == ["l", "m"] and all(r["metadata"]["perplexity"] > 1 for r in picked)
    tally = json.loads((tmp_path / "out" / "work" / "tally" / "long_context" / "00000.json").read_text())
    assert tally["removed"]["below_min_chars"][0] == 1 and tally["out"][0] == 2
