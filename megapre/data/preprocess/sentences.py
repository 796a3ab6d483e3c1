"""Offline, rule-based English sentence splitter for BERT-style preprocessing (--split-sentences).

Megatron uses nltk's punkt, which needs a data download at run time; this splitter needs nothing.
Rules: a sentence ends at . ! ? or an ellipsis, optionally followed by closing quotes/brackets, then
whitespace, then something that can start a sentence (not a lowercase letter). A period does not
end a sentence after a known abbreviation ("Mr.", "e.g."), a single-letter initial ("J. R. R."),
or inside a number ("3.14" has no whitespace after the period). A blank line always ends one.
"""
from __future__ import annotations

import re

# Lowercased, without the final period. Titles, Latin, units, months, corporate, address words.
ABBREVIATIONS = frozenset("""
mr mrs ms dr prof sr jr st rev hon gen col capt lt sgt cpl pvt adm cmdr gov pres sen rep messrs mme mlle
e.g i.e etc al cf vs viz approx ca esp fig figs eq eqs no nos vol vols pp p ed eds op cit ibid
inc ltd co corp bros dept est univ assn
jan feb mar apr jun jul aug sep sept oct nov dec
mon tue tues wed thu thur thurs fri sat sun
ave blvd rd mt ft
a.m p.m u.s u.k u.s.a d.c ph.d b.a m.a b.sc m.d
""".split())

_OPENERS = "\"'\u201c\u2018([{\u00bf\u00a1"
# terminator run, closing quotes/brackets, then the whitespace before the next sentence
_END = re.compile(r"([.!?\u2026]+)([\"'\u201d\u2019)\]}]*)(\s+)")
_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n\s*")


def _word_before(text: str, end: int) -> str:
    """The whitespace-delimited word ending at `end` (exclusive), without opening punctuation."""
    start = end
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    return text[start:end].lstrip(_OPENERS)


def _ends_sentence(text: str, m: re.Match) -> bool:
    nxt = m.end()
    if nxt < len(text):
        if text[nxt].islower():
            return False          # "e.g. the", "... and then": a sentence does not start lowercase
    if m.group(1) != ".":
        return True               # ! ? ... and runs like "?!" end sentences
    word = _word_before(text, m.start(1)).lower()
    if not word:
        return True
    if word in ABBREVIATIONS:
        return False
    if len(word) == 1 and word.isalpha():
        return False              # an initial: "J. Smith"
    if "." in word and all(len(part) <= 2 for part in word.split(".")):
        return False              # dotted abbreviations not in the list: "n.b", "q.v"
    return True


def _split_paragraph(text: str, base: int, spans: list[tuple[int, int]]) -> None:
    start = 0
    for m in _END.finditer(text):
        if _ends_sentence(text, m):
            spans.append((base + start, base + m.start(3)))
            start = m.end()
    if start < len(text):
        spans.append((base + start, base + len(text)))


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence, whitespace excluded, in order."""
    spans: list[tuple[int, int]] = []
    pos = 0
    for m in _PARAGRAPH.finditer(text):
        _split_paragraph(text[pos:m.start()], pos, spans)
        pos = m.end()
    _split_paragraph(text[pos:], pos, spans)
    out = []
    for s, e in spans:
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s:
            out.append((s, e))
    return out


def split_sentences(text: str, keep_newlines: bool = False) -> list[str]:
    """Sentences of `text`. With keep_newlines each sentence keeps the whitespace that follows it
    when that whitespace holds a newline, so joining the sentences restores the line breaks."""
    spans = sentence_spans(text)
    if not keep_newlines:
        return [text[s:e] for s, e in spans]
    out = []
    for i, (s, e) in enumerate(spans):
        nxt = spans[i + 1][0] if i + 1 < len(spans) else len(text)
        gap = text[e:nxt]
        out.append(text[s:nxt] if "\n" in gap else text[s:e])
    return out
