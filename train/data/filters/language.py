"""Offline language ID by script ratio (no model, no download): enough to route English and Chinese text.

Letters (``str.isalpha``) are counted by script: Han (CJK unified ideographs, extensions and compatibility
ideographs) and Latin (ASCII and the Latin-1/Extended letters). With H Han and L Latin letters out of A letters:
H / (H + L) >= ``zh_min_han`` -> ``zh`` (Chinese technical text mixes in Latin identifiers, so the bar is well
below one half); else L / A >= ``en_min_latin`` -> ``en``; fewer than ``min_letters`` letters -> ``unknown``;
otherwise ``other`` (Cyrillic, Arabic, Japanese kana, ...). Latin-script languages other than English are not
told apart from English by a script rule: that needs a trained model, which we do not download.
The result is written to ``metadata["language"]``; documents whose language is not in ``keep`` are removed with
reason ``lang_<language>``.
"""
from __future__ import annotations

import unicodedata

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter


def _is_han(c: str) -> bool:
    o = ord(c)
    return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x20000 <= o <= 0x2FA1F or 0xF900 <= o <= 0xFAFF


def script_language(text: str, zh_min_han: float = 0.3, en_min_latin: float = 0.8, min_letters: int = 20) -> str:
    han = latin = letters = 0
    for c in text:
        if not c.isalpha():
            continue
        letters += 1
        if _is_han(c):
            han += 1
        elif c.isascii() or "LATIN" in unicodedata.name(c, ""):
            latin += 1
    if letters < min_letters:
        return "unknown"
    if han / max(han + latin, 1) >= zh_min_han:
        return "zh"
    if latin / letters >= en_min_latin:
        return "en"
    return "other"


class ScriptLanguageFilter(BaseFilter):
    name = "🌐 script language"

    def __init__(self, keep=("en", "zh"), zh_min_han: float = 0.3, en_min_latin: float = 0.8, min_letters: int = 20):
        super().__init__()
        self.keep = set(keep)
        self.zh_min_han = zh_min_han
        self.en_min_latin = en_min_latin
        self.min_letters = min_letters

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lang = script_language(doc.text, self.zh_min_han, self.en_min_latin, self.min_letters)
        doc.metadata["language"] = lang
        return True if lang in self.keep else (False, f"lang_{lang}")
