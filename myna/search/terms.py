"""Search terms: how a post's text (and a query's words) become the tokens the lexical index stores.

SQLite FTS5's default tokenizer (unicode61) drops '#' and '@' and treats a run of Chinese or Japanese as one word,
so a search for #tag, @user, an emoji or two CJK characters would find nothing. Myna tokenizes in Python instead and
hands FTS5 the tokens joined by spaces; FTS5's `ascii` tokenizer (every non-ASCII character a token character, '#',
'@' and '_' declared token characters) then splits on those spaces and nothing else.

- words: NFKC-normalised and case-folded (`Café` and `café` match; accents are kept: they change meaning);
- `#tag` and `@user` stay whole, so `#python` does not match the word python and the reverse;
- scripts written without spaces (Han, Hiragana, Katakana, Thai, Lao, Khmer, Myanmar) become overlapping character
  bigrams, the usual trick of CJK search engines: a two-character query matches anywhere inside a run;
- each emoji is a token (skin tones and variation selectors dropped, so 👍🏽 finds 👍);
- links are not words: they are searched with filter:links.
"""

import re
import unicodedata
from collections import Counter

_NO_SPACE_SCRIPTS = (
    r"\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff"  # Thai, Lao, Myanmar, Khmer
    r"\u3040-\u30ff\u31f0-\u31ff"  # Hiragana, Katakana
    r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"  # Han
)
_TOKEN = re.compile(
    r"(?P<url>https?://\S+|www\.\S+)"
    r"|(?P<tag>[#＃][^\W_][\w]*)"
    r"|(?P<mention>[@＠]\w{1,50})"
    rf"|(?P<run>[{_NO_SPACE_SCRIPTS}]+)"
    rf"|(?P<word>(?:(?![{_NO_SPACE_SCRIPTS}])\w)+)"
    r"|(?P<other>\S)"
)
# emoji modifiers that change a glyph's look, not its meaning
_MODIFIERS = re.compile("[\ufe0e\ufe0f\u200d\U0001f3fb-\U0001f3ff]")


def fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def is_emoji(ch: str) -> bool:
    return unicodedata.category(ch) == "So" or 0x1F000 <= ord(ch) <= 0x1FAFF


def terms(text: str) -> list[str]:
    """A text -> its search tokens, in order (see the module docstring)."""
    out: list[str] = []
    for m in _TOKEN.finditer(_MODIFIERS.sub("", fold(text))):
        kind, tok = m.lastgroup, m.group()
        if kind == "tag":
            out.append("#" + tok[1:])
        elif kind == "mention":
            out.append("@" + tok[1:])
        elif kind == "run":
            out.extend([tok] if len(tok) == 1 else [tok[i : i + 2] for i in range(len(tok) - 1)])
        elif kind == "word":
            out.append(tok)
        elif kind == "other" and is_emoji(tok):
            out.append(tok)
    return out


def term_spans(text: str) -> list[tuple[int, int, list[str]]]:
    """(start, end, terms) of each piece of the text that yields search terms, in the text's own characters (for
    highlighting: a link yields none, so `python.org` in a URL is not a match for python)."""
    out = []
    for m in _TOKEN.finditer(text):
        if m.lastgroup != "url" and (found := terms(m.group())):
            out.append((m.start(), m.end(), found))
    return out


_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def tag_words(tag: str) -> str:
    """A hashtag as the words a person would type: 'PrayForVisayas' -> 'pray for visayas', 'yycflood' ->
    'yycflood', 'COVID19' -> 'covid 19'."""
    return " ".join(w.lower() for w in _CAMEL.findall(tag)) or tag.lower()


def written_tag_words(forms: Counter) -> str:
    """A hashtag's words from the ways people wrote it (form -> count): a form in mixed case shows where the words
    break (#PrayForVisayas), so the most common of those wins over the most common form."""
    mixed = [f for f, _ in forms.most_common() if f != f.lower() and f != f.upper()]
    return tag_words(mixed[0] if mixed else forms.most_common(1)[0][0])
