"""Queries as people write them on Twitter: words, "exact phrases", OR, -exclusions, #tags, @mentions and operators.

    parse('"new york" pizza OR pasta -pineapple from:alice since:2024-01-01 min_faves:10 -filter:replies')

Words, phrases, tags and mentions are clauses that must all match (OR joins neighbours into one clause); a leading
'-' excludes. Operators filter on a post's fields. An unknown operator or a malformed value is a QueryError that
names it and says what was expected: a query never silently means something else.
"""

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from myna.search.terms import terms


class QueryError(ValueError):
    pass


@dataclass(frozen=True)
class Phrase:
    """One or more search terms that must appear together, in order (a single word is a one-term phrase)."""

    terms: tuple[str, ...]
    text: str  # as written, for messages and highlighting

    @property
    def tag_or_mention(self) -> bool:
        return len(self.terms) == 1 and self.terms[0][0] in "#@"


@dataclass(frozen=True)
class AnyOf:
    """Phrases joined by OR: one of them must match."""

    options: tuple[Phrase, ...]


@dataclass
class Filters:
    from_users: list[str] = field(default_factory=list)  # any of (from:a OR from:b)
    to_users: list[str] = field(default_factory=list)
    since: datetime | None = None  # created_at >= since (UTC midnight)
    until: datetime | None = None  # created_at < until (UTC midnight), as Twitter's until: is exclusive
    lang: str | None = None
    min_faves: int = 0
    min_retweets: int = 0
    min_replies: int = 0
    replies: bool | None = None  # True: only replies, False: no replies, None: both
    links: bool | None = None


@dataclass
class Query:
    text: str
    must: list[AnyOf] = field(default_factory=list)
    must_not: list[Phrase] = field(default_factory=list)
    filters: Filters = field(default_factory=Filters)

    @property
    def has_text(self) -> bool:
        return bool(self.must)

    def words(self) -> list[str]:
        """Every positive term, for highlighting and for the dense query."""
        return [t for clause in self.must for p in clause.options for t in p.terms]


OPERATORS = (
    "from",
    "to",
    "since",
    "until",
    "lang",
    "min_faves",
    "min_retweets",
    "min_replies",
    "filter",
)
FILTER_VALUES = ("replies", "links")
MAX_QUERY_CHARS = 1000
MAX_INT = 10**12
_PIECE = re.compile(r'(-?)"([^"]*)"|(\S+)')
_OPERATOR = re.compile(r"^(-?)([A-Za-z_]+):(.*)$")
_USER = re.compile(r"^@?(\w{1,50})$")
_LANG = re.compile(r"^[a-z]{2,3}$")


def parse(text: str) -> Query:
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"query is {len(text)} characters; at most {MAX_QUERY_CHARS}")
    if text.count('"') % 2:
        raise QueryError('a phrase is not closed: a query needs an even number of double quotes (")')
    q = Query(text=text)
    last = None  # what the previous piece was: "text", "from", "to" or another operator's name
    pending_or = False
    for m in _PIECE.finditer(text):
        neg, quoted, bare = m.group(1), m.group(2), m.group(3)
        if bare == "OR":
            if last not in ("text", "from", "to") or pending_or:
                raise QueryError("OR needs a word, phrase, #tag, @mention, from: or to: on each side")
            pending_or = True
            continue
        op = (
            _OPERATOR.match(bare)
            if bare is not None and not bare.lower().startswith(("http:", "https:"))
            else None
        )
        if op and (
            op.group(3) or op.group(2).lower() in OPERATORS
        ):  # "update: ..." is a word, "bogus:1" is not
            name = op.group(2).lower()
            if pending_or and name != last:
                raise QueryError(
                    f"OR joins words with words, from: with from: and to: with to:, not {bare!r}"
                )
            _operator(q, op.group(1) == "-", name, op.group(3), bare, pending_or)
            last, pending_or = name, False
            continue
        negated = bool(neg) or (bare is not None and bare.startswith("-") and len(bare) > 1)
        written = quoted if quoted is not None else (bare[1:] if negated else bare)
        ts = tuple(terms(written))
        if not ts:
            if pending_or:
                raise QueryError(f"OR needs a searchable word after it, not {written!r}")
            continue  # punctuation alone searches nothing, as on Twitter
        phrase = Phrase(ts, written)
        if pending_or and (negated or last != "text"):
            raise QueryError(f"OR cannot join {m.group()!r} to what comes before it")
        if negated:
            q.must_not.append(phrase)
            last = "not"
        elif pending_or:
            q.must[-1] = AnyOf(q.must[-1].options + (phrase,))
            last = "text"
        else:
            q.must.append(AnyOf((phrase,)))
            last = "text"
        pending_or = False
    if pending_or:
        raise QueryError("OR needs a word, phrase, #tag, @mention, from: or to: on each side")
    if not q.must and not q.must_not and q.filters == Filters():
        raise QueryError("empty query: give words, a phrase, #tag, @user or an operator such as from:user")
    return q


def _operator(q: Query, negated: bool, name: str, value: str, written: str, joined: bool) -> None:
    f = q.filters
    if name not in OPERATORS:
        raise QueryError(
            f"unknown operator {name + ':'!r} in {written!r}; known: {', '.join(o + ':' for o in OPERATORS)} "
            "(put it in double quotes to search the text)"
        )
    if not value:
        raise QueryError(f"{written!r}: {name}: needs a value")
    if negated and name != "filter":
        raise QueryError(f"{written!r}: only filter: can be negated with '-'")
    if name in ("from", "to"):
        m = _USER.match(value)
        if not m:
            raise QueryError(f"{written!r}: expected a user name (letters, digits, _), like {name}:jack")
        users = f.from_users if name == "from" else f.to_users
        if users and not joined:
            raise QueryError(
                f"{written!r}: a post has one author and one parent; join {name}: values with OR"
            )
        users.append(m.group(1).casefold())
    elif name in ("since", "until"):
        try:
            day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
        except ValueError:
            raise QueryError(f"{written!r}: expected a date YYYY-MM-DD, like {name}:2024-01-31") from None
        setattr(f, name, day)
        if f.since and f.until and f.since >= f.until:
            raise QueryError(
                f"since:{f.since:%Y-%m-%d} is not before until:{f.until:%Y-%m-%d}: nothing can match"
            )
    elif name == "lang":
        if not _LANG.match(value.lower()):
            raise QueryError(f"{written!r}: expected a language code (ISO 639-1), like lang:en")
        f.lang = value.lower()
    elif name.startswith("min_"):
        if not value.isdigit() or int(value) > MAX_INT:
            raise QueryError(f"{written!r}: expected a whole number of at most {MAX_INT}, like {name}:10")
        setattr(f, name, int(value))
    else:
        if value.lower() not in FILTER_VALUES:
            raise QueryError(f"{written!r}: expected filter:replies or filter:links (or -filter:...)")
        setattr(f, value.lower(), not negated)
