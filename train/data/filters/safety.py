"""Safety filters: URL/domain blocklist (datatrove's URLFilter, offline) and a word-list filter (English, Chinese).

URL: datatrove's URLFilter with its shipped lists (4.5M blocked domains, ~20k URLs, banned and soft-banned URL
words) plus our domains file. Its ``TLDExtract()`` fetches the public-suffix list over the network first; here it
is built with ``suffix_list_urls=()`` so the snapshot inside tldextract is used. Documents without a URL pass.
datatrove compares the registered domain and the full host with its list; ours also blocks every host under one of
our entries.

Word list: the terms of the language's list (``train/data/seed/blocked_words_<lang>.txt``) are counted with an
Aho-Corasick automaton over the lower-cased text; English terms must match whole words (the characters around a
hit are not letters or digits), Chinese terms match as substrings (no spaces between words). A document is removed
when it has at least ``min_hits`` hits and hits / (characters / 1000) >= ``max_hits_per_kchar``: spam repeats its
terms densely, while an article that mentions one of them stays.
"""
from __future__ import annotations

import ahocorasick
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters.url_filter import URLFilter


class OfflineURLFilter(URLFilter):
    def __init__(self, extra_domains=None, soft_word_threshold: int = 2, use_integrated_lists: bool = True):
        from tldextract import TLDExtract

        super().__init__(soft_word_threshold=soft_word_threshold, extra_domains=extra_domains,
                         use_integrated_lists=use_integrated_lists)
        self.tldextractor = TLDExtract(suffix_list_urls=())
        self.our_hosts = frozenset(d.strip().lower() for d in extra_domains or ())

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        url = doc.metadata.get("url")
        if not url:
            return True
        verdict = super().filter(doc)
        if verdict is not True:
            return verdict
        # datatrove matches the registered domain and the full host; our list also blocks every host under an
        # entry (www.spam.example.net for spam.example.net, where example.net is the registered domain)
        host = self.tldextractor(url).fqdn.lower().split(".")
        if any(".".join(host[i:]) in self.our_hosts for i in range(len(host))):
            return False, "host_under_blocked"
        return True


def read_terms(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [t.strip().lower() for t in f if t.strip() and not t.startswith("#")]


class WordListFilter(BaseFilter):
    name = "🚫 word list"

    def __init__(self, terms: dict[str, list[str]], min_hits: int = 3, max_hits_per_kchar: float = 2.0):
        super().__init__()
        self.terms = terms
        self.min_hits = min_hits
        self.max_hits_per_kchar = max_hits_per_kchar
        self._automata: dict[str, ahocorasick.Automaton] | None = None

    def _automaton(self, lang: str):
        if self._automata is None:  # built in the worker (automata do not pickle across processes)
            self._automata = {}
            for name, words in self.terms.items():
                a = ahocorasick.Automaton()
                for w in words:
                    a.add_word(w, len(w))
                a.make_automaton()
                self._automata[name] = a
        return self._automata.get(lang)

    def hits(self, text: str, lang: str) -> int:
        text = text.lower()
        n = 0
        for name in ([lang] if lang in self.terms else list(self.terms)):
            a = self._automaton(name)
            for end, length in a.iter(text):
                start = end - length + 1
                if name != "zh" and ((start > 0 and text[start - 1].isalnum()) or
                                     (end + 1 < len(text) and text[end + 1].isalnum())):
                    continue
                n += 1
        return n

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        n = self.hits(doc.text, doc.metadata.get("language", ""))
        if n >= self.min_hits and n / max(len(doc.text) / 1000, 1e-9) >= self.max_hits_per_kchar:
            return False, "blocked_words"
        return True
