import html
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from datasketch import MinHash
from hypothesis import given, settings
from hypothesis import strategies as st

from myna.data.dedup import DedupConfig, bucket_pairs, comparison_key, dedup, lsh_params, minhash_signatures
from myna.data.schema import POST_SCHEMA

TEXT = Path(__file__).parent / "fixtures" / "text"
T0 = datetime(2009, 6, 1, tzinfo=UTC)


def lines(name: str) -> list[str]:
    return [html.unescape(t) for t in (TEXT / name).read_text(encoding="utf-8").splitlines() if t.strip()]


def unique_tweets() -> list[str]:
    seen, out = set(), []
    for t in lines("sentiment140_positive_1500.txt") + lines("sentiment140_negative_1500.txt"):
        if comparison_key(t) not in seen:
            seen.add(comparison_key(t))
            out.append(t)
    return out


TWEETS = unique_tweets()


def table(texts, authors=None, times=None) -> pa.Table:
    n = len(texts)
    return pa.table(
        {
            "id": [str(i) for i in range(n)],
            "author_id": authors or [None] * n,
            "created_at": pa.array(times or [None] * n, POST_SCHEMA.field("created_at").type),
            "text": texts,
        }
    )


def shingles(text: str, k: int = 5) -> set[str]:
    text = text if len(text) >= k else text.ljust(k, "\0")
    return {text[i : i + k] for i in range(len(text) - k + 1)}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def edit(text: str, rng: random.Random) -> str:
    """A small real-world edit: one word changed, punctuation added, or the handle swapped."""
    words = text.split()
    kind = rng.randrange(3)
    if kind == 0:
        i = rng.randrange(len(words))
        words[i] = rng.choice(["really", "sooo", "today", "lol", "omg"])
    elif kind == 1:
        words[-1] += rng.choice(["!!", ".", " :)", "?"])
    else:
        words = ["@" + rng.choice(["someone", "bff_22", "ddlovato"])] + [w for w in words if w[0] != "@"]
    return " ".join(words)


def long_tweets(n: int, min_chars: int = 60) -> list[str]:
    return [t for t in TWEETS if len(comparison_key(t)) >= min_chars][:n]


def test_lsh_layout_from_threshold():
    assert lsh_params(0.8, 64) == (7, 9)
    for threshold in (0.5, 0.7, 0.9):
        bands, rows = lsh_params(threshold, 128)
        assert bands * rows <= 128
        s = np.array([threshold - 0.3, threshold + 0.08])
        p = 1 - (1 - s**rows) ** bands
        assert p[0] < 0.1 and p[1] > 0.8  # the S-curve's step sits near the threshold


def test_signatures_shape_and_determinism():
    cfg = DedupConfig()
    sig = minhash_signatures(TWEETS[:50], cfg)
    assert sig.shape == (50, 64) and sig.dtype == np.uint32
    assert (minhash_signatures(TWEETS[:50], cfg) == sig).all()
    assert (minhash_signatures(TWEETS[:50], DedupConfig(seed=2)) != sig).mean() > 0.9
    alone = minhash_signatures([TWEETS[7]], cfg)  # a doc's signature does not depend on its batch
    assert (alone[0] == sig[7]).all()
    short = minhash_signatures(["hi", "hi", "ho", ""], cfg)
    assert (short[0] == short[1]).all() and (short[0] != short[2]).all()
    assert minhash_signatures([], cfg).shape == (0, 64)


def test_jaccard_estimates_match_exact_and_datasketch():
    rng = random.Random(0)
    a = [comparison_key(t) for t in long_tweets(300, 40)]
    b = [comparison_key(edit(t, rng)) for t in a]
    exact = np.array([jaccard(x, y) for x, y in zip(a, b, strict=True)])
    cfg = DedupConfig(num_perm=128)
    ours = (minhash_signatures(a, cfg) == minhash_signatures(b, cfg)).mean(axis=1)
    theirs = []
    for x, y in zip(a, b, strict=True):
        mx, my = MinHash(num_perm=128, seed=1), MinHash(num_perm=128, seed=1)
        mx.update_batch([s.encode() for s in shingles(x)])
        my.update_batch([s.encode() for s in shingles(y)])
        theirs.append(mx.jaccard(my))
    expected_rmse = np.sqrt(np.mean(exact * (1 - exact)) / 128)
    ours_rmse = np.sqrt(np.mean((ours - exact) ** 2))
    theirs_rmse = np.sqrt(np.mean((np.array(theirs) - exact) ** 2))
    assert ours_rmse < 1.25 * expected_rmse
    assert ours_rmse < 1.25 * theirs_rmse
    assert abs(np.mean(ours - exact)) < 0.02


def test_planted_near_duplicates_found_and_earliest_kept():
    rng = random.Random(1)
    originals = long_tweets(200)
    variants = [edit(t, rng) for t in originals]
    others = [t for t in TWEETS if t not in set(originals)][:1500]
    texts = variants + others + originals  # originals last in rows, but earliest in time
    n_var, n_oth = len(variants), len(others)
    times = [T0 + timedelta(hours=1)] * n_var + [T0] * n_oth + [T0 - timedelta(hours=1)] * len(originals)
    result = dedup(table(texts, times=times), DedupConfig())
    assert result.keep.sum() + sum(result.dropped.values()) == len(texts)
    first_original = n_var + n_oth
    similar = [
        i for i in range(n_var) if jaccard(comparison_key(variants[i]), comparison_key(originals[i])) >= 0.8
    ]
    found = [i for i in similar if result.dup_of[i] == first_original + i]
    assert len(similar) > 100 and len(found) >= 0.9 * len(similar)
    assert result.keep[first_original:].all()  # every original is kept, never its later copy
    assert result.dropped["exact_duplicate"] >= 1  # handle swaps are exact duplicates once handles go


def test_unrelated_real_tweets_rarely_merged():
    result = dedup(table(TWEETS), DedupConfig())
    merged = [(kept, row) for kept, *rows in result.clusters() for row in rows]
    assert result.dropped["exact_duplicate"] == 0  # TWEETS are unique by key already
    assert len(merged) == result.dropped["near_duplicate"]
    false = [(a, b) for a, b in merged if jaccard(comparison_key(TWEETS[a]), comparison_key(TWEETS[b])) < 0.6]
    assert len(merged) < 0.02 * len(TWEETS)  # near-dups in a real sample are rare...
    assert len(false) <= 0.001 * len(TWEETS)  # ...and the ones found are really similar


def test_exact_ignores_case_whitespace_handles_and_urls():
    texts = [
        "Can't fall asleep tonight",
        "@bob  can't FALL asleep\ntonight http://t.co/x",
        "can't fall asleep tonight!",  # punctuation differs: not exact
        "http://bit.ly/a",
        "http://bit.ly/b",  # nothing but a URL: compared in full, so these two differ
    ]
    result = dedup(table(texts), DedupConfig(near=False))
    assert result.keep.tolist() == [True, False, True, True, True]
    assert result.dup_of.tolist() == [-1, 0, -1, -1, -1]
    assert result.dropped["exact_duplicate"] == 1


def test_earliest_kept_nulls_last_ties_by_row():
    texts = ["same words in this post"] * 4
    times = [None, T0 + timedelta(days=1), T0, T0]
    result = dedup(table(texts, times=times), DedupConfig())
    assert result.keep.tolist() == [False, False, True, False]
    assert result.clusters() == [[2, 0, 1, 3]]
    result = dedup(table(texts), DedupConfig())  # all null: row order decides
    assert result.keep.tolist() == [True, False, False, False]


def test_author_repeat():
    spam = "Get 100 followers a day using www.tweeterfollow.com Once you add everyone you are on the train"
    texts = [spam] * 4 + ["Home from work. Start again at 8am. Epic."] * 3 + [spam]
    authors = ["bot"] * 4 + ["amy"] * 3 + ["carl"]
    result = dedup(table(texts, authors=authors), DedupConfig(author_repeat_max=3))
    assert result.keep.tolist() == [False] * 4 + [True, False, False, True]
    assert result.dropped["author_repeat"] == 4 and result.dropped["exact_duplicate"] == 2
    everyone = dedup(table(texts, authors=authors), DedupConfig(author_repeat_max=0))
    assert not everyone.keep.any() and everyone.dropped["author_repeat"] == len(texts)
    off = dedup(table(texts, authors=authors), DedupConfig(author_repeat_max=None))
    assert off.dropped["author_repeat"] == 0 and off.keep.sum() == 2


@settings(max_examples=40, deadline=None)
@given(
    picks=st.lists(st.integers(0, 30), max_size=40),
    authors=st.lists(st.sampled_from([None, "a", "b"]), min_size=40, max_size=40),
    hours=st.lists(st.one_of(st.none(), st.integers(0, 5)), min_size=40, max_size=40),
    cfg=st.builds(
        DedupConfig, exact=st.booleans(), near=st.booleans(), author_repeat_max=st.sampled_from([None, 1, 2])
    ),
)
def test_counts_add_up(picks, authors, hours, cfg):
    rng = random.Random(len(picks))
    texts = [TWEETS[p] if p % 3 else edit(TWEETS[p], rng) for p in picks]
    times = [None if h is None else T0 + timedelta(hours=h) for h in hours[: len(picks)]]
    result = dedup(table(texts, authors[: len(picks)], times), cfg)
    assert len(result.keep) == len(texts)
    assert result.keep.sum() + sum(result.dropped.values()) == len(texts)
    for kept, *rows in result.clusters():
        assert result.keep[kept] and not result.keep[rows].any()


def test_workers_give_the_same_signatures():
    texts = TWEETS * 2
    one = minhash_signatures(texts, DedupConfig(chunk=1000))
    two = minhash_signatures(texts, DedupConfig(chunk=1000, workers=2))
    assert (one == two).all()


def test_missing_column_and_null_text_rejected():
    with pytest.raises(ValueError, match="author_id"):
        dedup(pa.table({"id": ["1"], "created_at": [None], "text": ["x"]}), DedupConfig())
    with pytest.raises(ValueError, match=r"row 1 \(id '1'\): text is null"):
        dedup(table(["a", None]), DedupConfig())


def test_bucket_pairs_pairs_neighbours_not_only_the_first_member():
    # one bucket of three: the second and third members are a pair too (they were missed before)
    pairs = {tuple(p) for p in bucket_pairs(np.array([0, 0, 0]), np.array([5, 7, 9])).tolist()}
    assert pairs == {(5, 7), (5, 9), (7, 9)}
