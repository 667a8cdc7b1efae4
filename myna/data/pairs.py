"""Pairs of texts that belong together, mined from a prepared data directory, for contrastive embedding training.

Five kinds, each within one split (a pair whose two posts fall on different sides is left out and counted):
    reply     a post and its reply (in_reply_to_id -> id within corpus.parquet)
    dialogue  two consecutive user/assistant turns of a dialogue in dialogues.jsonl (a post and its reply, as the
              reply trees and conversation files gave them)
    hashtag   two posts that share a rare hashtag (carried by 2..max_tag_posts posts of the split), with that
              hashtag removed from both texts, so the pair must be matched by what the posts say
    quote     a quote and the post it quotes (quoted_id -> id)
    query     a hashtag's words as a person would search them ("pray for visayas") and a post that carries it, the
              hashtag removed: search's short queries against posts (up to QUERY_POSTS posts a hashtag)

Every pair carries a group (the thread, dialogue, hashtag or quoted post it came from): pairs of one group are
related, so a batch holds at most one of them and no text twice, and none of its negatives is a hidden positive.
Hashtags come from the `hashtags` column and, for sources that carry none (plain text, CSV), from the text itself.
Nothing here imports torch.
"""

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from myna.search.terms import written_tag_words

KINDS = ("reply", "dialogue", "hashtag", "quote", "query")
QUERY_POSTS = 8  # query pairs a hashtag gives at most: a common tag does not fill the batches
CORPUS_COLUMNS = ["id", "text", "in_reply_to_id", "quoted_id", "hashtags", "split"]
# a hashtag as written in a post: '#' not inside a word or an HTML entity, then a word with at least one letter
HASHTAG = re.compile(r"(?<![\w&])#(\w*[^\W\d_]\w*)")


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    kind: str  # one of KINDS
    group: str  # what the pair came from; pairs of one group never share a batch


def text_key(text: str) -> str:
    """Two texts with the same key are the same text (case and spacing aside)."""
    return " ".join(text.casefold().split())


def hashtags_of(text: str, listed: list[str] | None) -> set[str]:
    """A post's hashtags, case-folded, without '#': the listed ones and those written in the text."""
    return {t.casefold() for t in listed or []} | {t.casefold() for t in HASHTAG.findall(text)}


def remove_hashtag(text: str, tag: str) -> str:
    """The text without every `#tag` (any case), spacing tidied."""
    without = re.sub(rf"(?<![\w&])#{re.escape(tag)}(?!\w)", " ", text, flags=re.IGNORECASE)
    return " ".join(without.split())


def _usable(a: str, b: str) -> bool:
    """Both texts hold a word, and they differ: a pair of one text teaches nothing."""
    return bool(re.search(r"\w", a) and re.search(r"\w", b)) and text_key(a) != text_key(b)


def read_corpus(path: Path) -> dict[str, list]:
    """The columns of corpus.parquet that pairs are mined from."""
    return pq.read_table(path, columns=CORPUS_COLUMNS).to_pydict()


def hashtag_carriers(
    corpus: dict[str, list], split: str | None = None
) -> tuple[dict[tuple[str, str], list[int]], dict[str, Counter]]:
    """(split, tag) -> the rows that carry the tag (case-folded, without '#'), and tag -> how its posts wrote it
    (form -> count: "PrayForVisayas" shows where the words break); only the rows of `split` when given."""
    carriers: dict[tuple[str, str], list[int]] = defaultdict(list)
    written: dict[str, Counter] = defaultdict(Counter)
    for i, (text, listed, side) in enumerate(
        zip(corpus["text"], corpus["hashtags"], corpus["split"], strict=True)
    ):
        if split is None or side == split:
            for tag in hashtags_of(text, listed):
                carriers[(side, tag)].append(i)
            for form in [*(listed or []), *HASHTAG.findall(text)]:
                written[form.casefold()][form] += 1
    return carriers, written


def corpus_pairs(corpus: dict[str, list], max_tag_posts: int) -> tuple[dict[str, list[Pair]], Counter]:
    """split -> the reply, quote and hashtag pairs of corpus.parquet's columns; and counts of pairs left out
    because their posts fall on different sides of the split (`cross_split_reply`, `cross_split_quote`)."""
    ids, texts, splits = corpus["id"], corpus["text"], corpus["split"]
    row = {post_id: i for i, post_id in enumerate(ids)}
    pairs: dict[str, list[Pair]] = defaultdict(list)
    dropped: Counter = Counter()
    for kind, column in (("reply", "in_reply_to_id"), ("quote", "quoted_id")):
        for i, other in enumerate(corpus[column]):
            j = row.get(other) if other else None
            if j is None or j == i or not _usable(texts[j], texts[i]):
                continue
            if splits[i] != splits[j]:
                dropped[f"cross_split_{kind}"] += 1
                continue
            pairs[splits[i]].append(Pair(texts[j], texts[i], kind, f"{kind}:{other}"))

    carriers, written = hashtag_carriers(corpus)
    for (split, tag), rows in sorted(carriers.items()):
        if len(rows) < 2:
            continue
        rows = sorted(rows, key=lambda i: ids[i])
        query = written_tag_words(written[tag]) if written[tag] else tag
        for i in rows[:QUERY_POSTS]:
            post = remove_hashtag(texts[i], tag)
            if _usable(query, post):
                pairs[split].append(Pair(query, post, "query", f"hashtag:{tag}"))
        if len(rows) > max_tag_posts:
            continue
        for i, j in zip(rows[0::2], rows[1::2], strict=False):  # disjoint pairs: no post dominates its tag
            a, b = remove_hashtag(texts[i], tag), remove_hashtag(texts[j], tag)
            if _usable(a, b):
                pairs[split].append(Pair(a, b, "hashtag", f"hashtag:{tag}"))
    return pairs, dropped


def dialogue_pairs(dialogues: list[dict], groups: list[str], held_out: list[bool]) -> dict[str, list[Pair]]:
    """split ("train" / "val") -> consecutive user/assistant turns of each dialogue; `groups[i]` names dialogue
    i's conversation (branches of one reply tree share it) and `held_out[i]` its side."""
    pairs: dict[str, list[Pair]] = defaultdict(list)
    for d, group, val in zip(dialogues, groups, held_out, strict=True):
        turns = [m for m in d["messages"] if m["role"] in ("user", "assistant")]
        for first, second in zip(turns, turns[1:], strict=False):
            a, b = first.get("content"), second.get("content")
            if (
                first["role"] != second["role"]
                and isinstance(a, str)
                and isinstance(b, str)
                and _usable(a, b)
            ):
                pairs["val" if val else "train"].append(Pair(a, b, "dialogue", f"dialogue:{group}"))
    return pairs


def unique(pairs: list[Pair]) -> list[Pair]:
    """The pairs without repeats (the same two texts, in either order), in their order."""
    seen, kept = set(), []
    for p in pairs:
        key = frozenset((text_key(p.a), text_key(p.b)))
        if key not in seen:
            seen.add(key)
            kept.append(p)
    return kept


def count_kinds(pairs: list[Pair]) -> dict[str, int]:
    counts = Counter(p.kind for p in pairs)
    return {kind: counts[kind] for kind in KINDS}
