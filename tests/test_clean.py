import html
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from myna.data.clean import CleanConfig, clean_posts, clean_table, normalise, scrub_pii, source_language
from myna.data.schema import POST_SCHEMA, new_post, posts_to_table

TEXT = Path(__file__).parent / "fixtures" / "text"
UMSAB = {"ar": "arabic", "de": "german", "en": "english", "es": "spanish", "fr": "french", "it": "italian"}
UMSAB |= {"pt": "portuguese"}


def lines(name: str) -> list[str]:
    return [html.unescape(t) for t in (TEXT / name).read_text(encoding="utf-8").splitlines() if t.strip()]


def posts_of(texts: list[str], **fields) -> list[dict]:
    return [new_post(str(i), t, f"fixture:{i + 1}", **fields) for i, t in enumerate(texts)]


TWEETS = lines("sentiment140_positive_1500.txt") + lines("sentiment140_negative_1500.txt")


def test_real_tweets_mostly_kept_and_counts_add_up():
    posts = posts_of(TWEETS)
    result = clean_posts(posts, CleanConfig())
    assert len(result.kept) + sum(result.dropped.values()) == len(posts)
    assert len(result.kept) > 0.9 * len(posts)
    assert all(p["lang"] for p in result.kept)
    english = sum(p["lang"] == "en" for p in result.kept)
    assert english > 0.85 * len(result.kept)
    assert posts[0]["text"] == TWEETS[0]  # inputs are not modified
    assert set(result.dropped) <= {
        "too_few_words",
        "too_short",
        "repeated_chars",
        "repeated_words",
        "hashtag_spam",
    }


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(st.one_of(st.text(max_size=80), st.sampled_from(TWEETS)), max_size=20),
    reposts=st.lists(st.booleans(), min_size=20, max_size=20),
    langs=st.lists(st.sampled_from([None, "und", "en", "fr", "qme", "zh-cn"]), min_size=20, max_size=20),
    flags=st.fixed_dictionaries(
        {
            "mask_handles": st.booleans(),
            "mask_urls": st.booleans(),
            "scrub_pii": st.booleans(),
            "drop_reposts": st.booleans(),
            "languages": st.sampled_from([None, frozenset({"en"}), frozenset({"fr", "und"})]),
            "min_chars": st.sampled_from([None, 0, 10]),
            "min_words": st.sampled_from([None, 3]),
            "max_char_run": st.sampled_from([None, 2, 15]),
            "max_repeated_word_share": st.sampled_from([None, 0.0, 0.5]),
        }
    ),
)
def test_every_post_kept_or_counted_once(texts, reposts, langs, flags):
    posts = [
        new_post(str(i), t, f"h:{i}", lang=langs[i], repost_of_id="9" if reposts[i] else None)
        for i, t in enumerate(texts)
    ]
    result = clean_posts(posts, CleanConfig(**flags))
    assert len(result.kept) + sum(result.dropped.values()) == len(posts)
    assert all(n > 0 for n in result.dropped.values())
    for post in result.kept:
        assert (
            post["text"] == post["text"].strip() and "  " not in post["text"] and "\n\n" not in post["text"]
        )
        assert unicodedata.is_normalized("NFC", post["text"])


def test_normalisation():
    assert normalise("Cafe\u0301  au\t lait\u00a0!") == "Caf\u00e9 au lait !"
    assert normalise("  line one \r\n\r\n\n  line two\u2028three \x00\x07") == "line one\nline two\nthree"
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    assert normalise(f"we are {family} \U0001f44d\U0001f3fd") == f"we are {family} \U0001f44d\U0001f3fd"


def test_masking_follows_tweeteval():
    post = new_post("1", "@Jotacon thanks!! see https://t.co/abc and @bob_2: httpfoo", "s:1", lang="en")
    (kept,) = clean_posts([post], CleanConfig(mask_handles=True, mask_urls=True)).kept
    assert kept["text"] == "@user thanks!! see http and @user http"
    (plain,) = clean_posts([post], CleanConfig()).kept
    assert plain["text"] == post["text"]


def test_reposts_dropped():
    posts = posts_of(TWEETS[:3])
    posts[0]["repost_of_id"] = "123"
    posts[1]["text"] = "RT @mileycyrus: " + posts[1]["text"]
    result = clean_posts(posts, CleanConfig(languages=None))
    assert result.dropped["repost"] == 2 and len(result.kept) == 1
    assert len(clean_posts(posts, CleanConfig(drop_reposts=False)).kept) == 3


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("ok bye", "too_short"),
        ("x" * 30 + " " + "word " * 1200, "too_long"),
        ("@someone @other http://t.co/x yes", "too_few_words"),
        ("great day #sun #fun #beach #summer #happy", "hashtag_spam"),
        ("@a @b @c @d @e @f @g @h @i @j @k @l hi you all", "mention_spam"),
        ("look at this http://a.co/1 http://a.co/2 http://a.co/3 http://a.co/4 www.x.com now", "url_spam"),
        ("I love you<3333333333333333333333 so much", "repeated_chars"),
        ("go go go go go go go go go team", "repeated_words"),
    ],
)
def test_each_filter_has_its_reason(text, reason):
    result = clean_posts([new_post("1", text, "s:1", lang="en")], CleanConfig())
    assert result.dropped == {reason: 1} and not result.kept


def test_disabled_filters_keep_everything_but_empty():
    off = CleanConfig(
        drop_reposts=False,
        detect_language=False,
        min_chars=None,
        max_chars=None,
        min_words=None,
        max_hashtag_ratio=None,
        max_mention_ratio=None,
        max_url_ratio=None,
        max_char_run=None,
        max_repeated_word_share=None,
        scrub_pii=False,
    )
    texts = ["ok", "#a #b #c", "@a @b", "soooooooooooooooooooooooooo", "RT @x: hi", " \n "]
    result = clean_posts(posts_of(texts), off)
    assert [p["text"] for p in result.kept] == texts[:5]
    assert all(p["lang"] == "und" for p in result.kept)
    assert result.dropped == {"empty": 1}


def test_source_language_codes():
    assert source_language("en") == "en" and source_language("pt-BR") == "pt"
    assert source_language("in") == "id" and source_language("iw") == "he"
    for none in (None, "", "und", "zxx", "qme", "qht"):
        assert source_language(none) is None


@pytest.mark.parametrize("code", sorted(UMSAB))
def test_language_detected_on_real_multilingual_tweets(code):
    texts = lines(f"umsab_{UMSAB[code]}_test40.txt")
    result = clean_posts(posts_of(texts), CleanConfig(min_words=None, min_chars=None))
    right = sum(p["lang"] == code for p in result.kept)
    assert right >= 0.75 * len(result.kept)
    only = clean_posts(
        posts_of(texts), CleanConfig(languages=frozenset({code}), min_words=None, min_chars=None)
    )
    assert {p["lang"] for p in only.kept} == {code}
    assert len(only.kept) == right and only.dropped["lang"] == len(result.kept) - right


def test_source_language_wins_over_detection():
    french = lines("umsab_french_test40.txt")[:5]
    result = clean_posts(posts_of(french, lang="de"), CleanConfig(min_words=None))
    assert {p["lang"] for p in result.kept} == {"de"}
    result = clean_posts(posts_of(french, lang="und"), CleanConfig(min_words=None))
    assert "fr" in {p["lang"] for p in result.kept}


def test_pii_scrubbed():
    counts = Counter()
    text = (
        "mail lunasin@live.com or me.too+x@mail.co.uk, call (804) 858-3902 / +44 20 7946 0958 / "
        "06 12 34 56 78 / 978-277-8841, card 4111 1111 1111 1111 or 5500-0000-0000-0004"
    )
    assert scrub_pii(text, counts) == (
        "mail <email> or <email>, call <phone> / <phone> / <phone> / <phone>, card <card> or <card>"
    )
    assert counts == {"email": 2, "phone": 4, "card": 2}


@pytest.mark.parametrize(
    "text",
    [
        "met on 2009-06-15 at 10:30, paid $1,299.99 for 1000000 beans",
        "dates 15.06.2009 and 01/06/2009, score 3-2, tel 911",
        "see https://twitter.com/user/status/1234567890123456789 and www.x.com/a?phone=480-299-6988",
        "id 1234567890123456789 and card-ish 4111 1111 1111 1112",  # a snowflake id; a Luhn failure
        "follow @mileycyrus@EmilyOsment for news",  # handles glued together are not e-mails
    ],
)
def test_pii_leaves_ordinary_numbers_alone(text):
    counts = Counter()
    assert scrub_pii(text, counts) == text and not counts


def test_pii_on_real_tweets_counted():
    result = clean_posts(posts_of(TWEETS), CleanConfig())
    texts = "\n".join(p["text"] for p in result.kept)
    assert "480.299.6988" not in texts and "<phone>" in texts
    assert result.pii["email"] == texts.count("<email>") > 0
    assert result.pii["phone"] == texts.count("<phone>")
    assert "@" not in " ".join(w for w in texts.split() if "<email>" in w)


def test_bad_text_names_the_post():
    post = new_post("42", "x", "dump.jsonl:7")
    post["text"] = None
    with pytest.raises(TypeError, match=r"'42'.*dump.jsonl:7.*'text'"):
        clean_posts([post], CleanConfig())


def test_clean_table_matches_clean_posts_on_real_tweets():
    posts = posts_of(TWEETS)
    for i, p in enumerate(posts[:200]):  # some carry their own language and are reposts
        p["lang"] = "en" if i % 3 == 0 else None
        p["repost_of_id"] = "1" if i % 17 == 0 else None
    cfg = CleanConfig(languages={"en"})
    expected = clean_posts(posts, cfg)
    kept, dropped, pii = clean_table(posts_to_table(posts), cfg)
    assert kept.schema == POST_SCHEMA
    assert kept.to_pylist() == posts_to_table(expected.kept).to_pylist()
    assert dropped == expected.dropped and pii == expected.pii
    assert dropped["repost"] >= 10 and dropped["lang"] > 0
