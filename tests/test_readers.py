"""Readers: real API/archive fixtures parse with hand-checked counts and fields; bad input becomes Rejects."""

import csv
import gzip
import json
import string
import tempfile
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from myna.data.readers import (
    FORMATS,
    InputFileError,
    ReadOptions,
    detect_format,
    read_posts,
    split_json_document,
)
from myna.data.schema import POST_SCHEMA, Reject, new_post, posts_to_table

API = Path(__file__).resolve().parents[1] / "data" / "sample" / "api"


def read_all(path, fmt=None, options=None) -> tuple[list[dict], list[Reject]]:
    posts, rejects = [], []
    for item in read_posts(path, fmt, options):
        (rejects if isinstance(item, Reject) else posts).append(item)
    return posts, rejects


def by_id(posts: list[dict]) -> dict[str, dict]:
    return {p["id"]: p for p in posts}


def archive_texts() -> list[str]:
    """Real post texts (the archive fixture's full_text), for building CSV and text inputs."""
    raw = (API / "archive" / "tweet.js").read_text()
    return [entry["tweet"]["full_text"] for entry in json.loads(raw[raw.index("=") + 1 :])]


# --- every fixture: detected format, post count, rejects (line, reason) -------------------------------------------
# Counts checked by hand with json.loads on the files: a v1 post count includes the retweeted/quoted statuses inside
# (get_home_timeline: 20 statuses, 14 retweets, 15 distinct originals/quotes inside -> 35); a v2 count is data +
# includes.tweets deduplicated by id (two_tweets: 1 retweet + its original).
COMPLIANCE = "not a post: v2 compliance event"
FIXTURES = {
    "archive/tweet.js": ("archive", 22, []),
    "archive/tweets_head10.js": ("archive", 10, []),
    "v1/ark_daily547_head20.jsonl.zst": ("v1", 22, []),  # 20 lines, 2 retweets carry their original
    "v1/extended_tweet_in_compat_mode.json": ("v1", 1, []),
    "v1/extended_tweet_in_extended_mode.json": ("v1", 1, []),
    "v1/get_home_timeline.json": ("v1", 35, []),
    "v1/get_search.json": ("v1", 1, []),  # {"statuses": [1 status]}
    "v1/get_status.json": ("v1", 1, []),
    "v1/get_user.json": ("v1", 0, [(1, "not a post: user object")]),
    "v1/post_retweet.json": ("v1", 2, []),
    "v1/post_update_with_place.json": (
        "v1",
        0,
        [(1, "missing text")],
    ),  # python-twitter's model dict, no text
    "v1/public_timeline.json": ("v1", 20, []),  # 2007 shape: integer ids, no id_str
    "v1/status_quoted_tweet.json": ("v1", 2, []),
    "v1/streaming_extended_tweet.json": ("v1", 1, []),
    "v1/streaming_lines_head10.jsonl.gz": ("v1", 12, []),  # 10 lines, 2 carry a quoted status
    "v2/counts.jsonl": ("v2", 0, [(1, "not a post: v2 tweet counts response")]),
    "v2/edited.jsonl": ("v2", 2, []),
    "v2/empty.json": (None, 0, []),
    "v2/flat_head5.jsonl": ("v2", 8, []),  # 5 flattened tweets + 3 inlined originals
    "v2/geo_tweets.jsonl": ("v2", 3, []),
    "v2/lists.jsonl": ("v2", 0, [(1, "not a post: v2 lists response"), (2, "not a post: v2 lists response")]),
    "v2/mentions_tweet.jsonl": ("v2", 2, []),
    "v2/quoted_edit.jsonl": ("v2", 3, []),
    "v2/streaming_output_with_error.jsonl": ("v2", 11, [(8, "invalid JSON")]),  # line 8 is cut mid-object
    "v2/tweets_compliance.jsonl": ("v2", 0, [(2, COMPLIANCE), (3, COMPLIANCE)]),  # line 1 is blank
    "v2/two_tweets.jsonl": ("v2", 2, []),
    "v2/users_compliance.jsonl": ("v2", 0, [(1, COMPLIANCE), (2, COMPLIANCE)]),
}


def test_fixture_table_covers_every_file():
    files = {str(p.relative_to(API)) for p in API.rglob("*") if p.is_file() and p.name != "PROVENANCE.md"}
    assert files == set(FIXTURES)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_parses_with_expected_counts(name):
    fmt, n_posts, expected_rejects = FIXTURES[name]
    path = API / name
    if fmt is not None:
        assert detect_format(path) == fmt
    posts, rejects = read_all(path)
    assert len(posts) == n_posts
    assert len(rejects) == len(expected_rejects)
    for reject, (line, reason) in zip(rejects, expected_rejects, strict=True):
        assert (reject.line, reject.file) == (line, str(path))
        assert reject.reason.startswith(reason)
    table = posts_to_table(posts)  # every post fits the Arrow schema
    assert table.num_rows == n_posts
    assert len(set(table.column("id").to_pylist())) == n_posts
    assert all(p["source"].startswith(f"{path}:") for p in posts)


# --- field mapping on real records -----------------------------------------------------------------------------------


def test_v1_search_envelope_unescapes_html_and_maps_fields():
    [post], _ = read_all(API / "v1" / "get_search.json")
    assert post["id"] == "674342688083283970"
    assert post["text"].startswith("🎶 C++, Java, Python & Ruby. These are a few")
    assert "&amp;" not in post["text"]
    assert post["created_at"] == datetime(2015, 12, 8, 21, 40, 0, tzinfo=UTC)
    assert post["author_id"] == "58309829" and post["author_name"] == "NickelodeonTV"
    assert (post["like_count"], post["repost_count"]) == (126, 28)
    assert post["hashtags"] == ["HourOfCode"]
    assert post["urls"] == ["https://vine.co/v/i7QJji9Ldmr"]  # expanded, not the t.co link
    assert post["source"] == f"{API / 'v1' / 'get_search.json'}:1"


def test_v1_extended_tweet_full_text_wins():
    [post], _ = read_all(API / "v1" / "streaming_extended_tweet.json")
    # `text` is cut at 140 characters; extended_tweet.full_text is 207 characters with one "&amp;".
    assert len(post["text"]) == 207 - len("amp;")
    assert post["text"].endswith("ClouData & Multiverse -  https://t.co/cnCBNJvu6T")
    assert (post["reply_count"], post["quote_count"]) == (0, 0)
    assert len(post["urls"]) == 2  # extended_tweet.entities, not the truncated text's
    [extended], _ = read_all(API / "v1" / "extended_tweet_in_extended_mode.json")
    [compat], _ = read_all(API / "v1" / "extended_tweet_in_compat_mode.json")
    assert extended["id"] == compat["id"]
    assert compat["text"].endswith("… https://t.co/et3OTOxWSa")
    assert "python_twitter.egg-info/SOURCE" in extended["text"]


def test_v1_retweet_and_quote_linkage():
    posts = by_id(read_all(API / "v1" / "get_home_timeline.json")[0])
    retweet, original = posts["674674925823787008"], posts["674659346127679488"]
    assert retweet["repost_of_id"] == original["id"]
    assert (
        retweet["text"]
        == original["text"]
        == "I could watch this for hours and I might https://t.co/rIgO3E2mqI"
    )
    assert original["repost_of_id"] is None
    posts = by_id(read_all(API / "v1" / "status_quoted_tweet.json")[0])
    assert posts["849424628401541121"]["quoted_id"] == "849412806835351552"
    assert posts["849412806835351552"]["mentions"] == ["mastodonmusic"]


def test_v1_old_shapes():
    posts, _ = read_all(API / "v1" / "public_timeline.json")
    assert posts[0]["id"] == "89497702"  # integer id, no id_str
    assert posts[0]["author_id"] == "2038581"
    assert posts[0]["created_at"] == datetime(2007, 6, 3, 17, 59, 37, tzinfo=UTC)
    assert [p["source"].rsplit(":", 1)[1] for p in posts[:3]] == [
        "1",
        "2",
        "3",
    ]  # record index in the document
    posts = by_id(read_all(API / "v1" / "ark_daily547_head20.jsonl.zst")[0])
    assert posts["26085492428636161"]["repost_of_id"] == "26083854217383937"
    assert posts["27051600186966017"]["repost_of_id"] == "27043669882183680"
    assert posts["21294091501314048"]["source"].endswith("ark_daily547_head20.jsonl.zst:1")


def test_v1_stream_notices_are_counted_rejects(tmp_path):
    status = gzip.open(API / "v1" / "streaming_lines_head10.jsonl.gz").readline()
    path = tmp_path / "stream.jsonl"
    path.write_bytes(
        status
        + b'{"delete":{"status":{"id":1,"id_str":"1","user_id":3,"user_id_str":"3"}}}\n'
        + b'{"limit":{"track":1234}}\n'
        + status
    )
    assert detect_format(path) == "v1"
    posts, rejects = read_all(path)
    assert [p["source"] for p in posts] == [f"{path}:1", f"{path}:4"]  # deduplication across lines is later
    assert [(r.line, r.reason) for r in rejects] == [
        (2, "not a post: delete notice"),
        (3, "not a post: limit notice"),
    ]


def test_v1_counts_given_as_strings(tmp_path):
    status = json.loads((API / "v1" / "get_status.json").read_text())
    status["retweet_count"] = "100+"  # 2010-era v1 reported 100 or more like this
    status["favorite_count"] = "12"
    path = tmp_path / "status.json"
    path.write_text(json.dumps(status))
    [post], _ = read_all(path)
    assert (post["repost_count"], post["like_count"]) == (100, 12)
    status["favorite_count"] = "many"
    path.write_text(json.dumps(status))
    [], [reject] = read_all(path)
    assert reject.reason.startswith("favorite_count: expected a count")


def test_archive_string_counts_and_replies():
    posts, _ = read_all(API / "archive" / "tweet.js")
    assert (posts[0]["id"], posts[0]["like_count"], posts[0]["repost_count"]) == (
        "1221130902635458567",
        35,
        6,
    )
    assert sum(p["like_count"] for p in posts) == 1198
    assert sum(p["in_reply_to_id"] is not None for p in posts) == 9
    assert any(p["mentions"] == ["SquireofTwitch"] for p in posts)
    assert posts[0]["created_at"] == datetime(2020, 1, 25, 18, 1, 9, tzinfo=UTC)
    newer, _ = read_all(API / "archive" / "tweets_head10.js")
    assert sum(p["in_reply_to_id"] is not None for p in newer) == 6


def test_v2_retweet_gets_original_full_text():
    retweet, original = read_all(API / "v2" / "two_tweets.jsonl")[0]
    assert retweet["id"] == "1394735776701816833"
    assert retweet["repost_of_id"] == original["id"] == "1391677057810288641"
    assert retweet["text"] == original["text"] == "#POIUYTREWQ"  # was "RT @bibaigna96: #POIUYTREWQ"
    assert retweet["conversation_id"] == "1394735776701816833"
    assert (retweet["repost_count"], retweet["reply_count"], retweet["like_count"]) == (1, 0, 0)
    assert retweet["created_at"] == datetime(2021, 5, 18, 19, 24, 56, tzinfo=UTC)
    assert original["author_id"] == "1380086327023169540"
    # screen names from the page's includes.users, and from a flattened tweet's inline author
    assert (retweet["author_name"], original["author_name"]) == ("LachiVeronica", "bibaigna96")
    flat = read_all(API / "v2" / "flat_head5.jsonl")[0]
    assert flat[0]["text"].startswith("De manera simultánea") and flat[0]["text"].endswith(
        "hace sentir su regreso."
    )
    assert flat[0]["author_name"] == "Alexandravm12"


def test_v2_note_tweet_long_text(tmp_path):
    page = json.loads((API / "v2" / "two_tweets.jsonl").read_text())
    original = page["includes"]["tweets"][0]
    long_text = "#POIUYTREWQ " + " ".join(["a long post &amp; more"] * 40)
    original["note_tweet"] = {
        "text": long_text,
        "entities": {"hashtags": [{"start": 0, "end": 11, "tag": "X"}]},
    }
    path = tmp_path / "note.jsonl"
    path.write_text(json.dumps(page) + "\n")
    retweet, note = read_all(path)[0]
    assert note["text"] == long_text.replace("&amp;", "&")
    assert note["hashtags"] == ["X"]
    assert retweet["text"] == note["text"]  # the retweet takes the original's whole text


# --- CSV and text, built from real post texts ------------------------------------------------------------------------


def test_csv_with_header_sniffs_columns(tmp_path):
    texts = archive_texts()[17:22]  # the last has a newline, quotes and commas
    assert "\n" in texts[-1]
    path = tmp_path / "care.csv"
    rows = [["tweet_id", "author_id", "inbound", "created_at", "text", "in_response_to_tweet_id"]]
    rows += [[str(i), "u1", "True", "Tue Oct 31 22:10:47 +0000 2017", t, ""] for i, t in enumerate(texts, 1)]
    rows.append(["9", "u2", "False"])  # wrong number of columns
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    assert detect_format(path) == "csv"
    posts, rejects = read_all(path)
    assert [p["text"] for p in posts] == texts
    assert posts[0]["id"] == "1" and posts[0]["author_id"] == "u1"
    assert posts[0]["created_at"] == datetime(2017, 10, 31, 22, 10, 47, tzinfo=UTC)
    assert posts[0]["source"] == f"{path}:2"
    [reject] = rejects
    assert reject.reason == "expected 6 columns, got 3"
    assert reject.line == 2 + len(texts) + texts[-1].count("\n")  # physical line where the bad row starts


def test_csv_sentiment140_headerless(tmp_path):
    texts = [t.replace("\n", " ") for t in archive_texts()[:4]]
    lines = [
        f'"4","{1467810369 + i}","Mon Apr 06 22:19:45 PDT 2009","NO_QUERY","user{i}","{t}"'
        for i, t in enumerate(texts)
    ]
    lines.insert(2, '"0","1","Mon Apr 06 22:19:45 PDT 2009","NO_QUERY","x"')  # 5 columns
    path = tmp_path / "training.csv"
    path.write_text("\n".join(lines) + "\n")
    for options in (None, ReadOptions(csv_preset="sentiment140")):
        posts, rejects = read_all(path, "csv", options)
        assert [p["text"] for p in posts] == texts
        assert posts[0]["id"] == "1467810369" and posts[0]["author_id"] == posts[0]["author_name"] == "user0"
        assert posts[0]["created_at"] == datetime(2009, 4, 7, 5, 19, 45, tzinfo=UTC)  # PDT is UTC-7
        assert [(r.line, r.reason) for r in rejects] == [(3, "expected 6 columns, got 5")]


def test_csv_explicit_mapping_and_tsv(tmp_path):
    texts = [t.replace("\n", " ").replace("\t", " ") for t in archive_texts()[:3]]
    path = tmp_path / "posts.tsv"
    path.write_text("".join(f"{t}\t{i}\n" for i, t in enumerate(texts)))
    posts, _ = read_all(path, options=ReadOptions(csv_columns={"text": 0, "like_count": 1}, csv_header=False))
    assert [(p["text"], p["like_count"]) for p in posts] == [(t, i) for i, t in enumerate(texts)]
    assert posts[0]["id"] == "posts:1"  # no id column: "<file stem>:<line>"
    # 2 columns, which is the text? No row can be read: the file is rejected whole, not as one record of many
    with pytest.raises(InputFileError, match=r"posts\.tsv: headerless CSV with 2 columns: set ReadOptions"):
        read_all(path, options=ReadOptions(csv_header=False))
    with pytest.raises(ValueError, match="hashtags"):
        read_posts(path, options=ReadOptions(csv_columns={"hashtags": 0}))


def test_files_of_other_kinds_are_no_post_format(tmp_path):
    page, plain = tmp_path / "index.html", tmp_path / "part-00000"
    page.write_text("<html><body>\n<p>hello</p>\n</body></html>\n")
    plain.write_text("a post\nanother post\n")
    with pytest.raises(
        InputFileError, match=r"index\.html: a \.html file, no post format .* \(--format text"
    ):
        detect_format(page)
    assert len(read_all(page, fmt="text")[0]) == 3  # the user's word reads it anyway
    assert detect_format(plain) == "text"


def test_text_one_post_per_line(tmp_path):
    texts = [t.replace("\n", " ") for t in archive_texts()[:3]]
    path = tmp_path / "pos.txt.gz"
    path.write_bytes(gzip.compress(f"{texts[0]}\n\n{texts[1]}\r\n &quot;q&quot; {texts[2]}\n".encode()))
    assert detect_format(path) == "text"
    posts, rejects = read_all(path)
    assert [p["id"] for p in posts] == ["pos:1", "pos:3", "pos:4"]
    assert posts[1]["text"] == texts[1]  # \r\n handled
    assert posts[2]["text"] == f' "q" {texts[2]}'
    assert [(r.line, r.reason) for r in rejects] == [(2, "empty text")]


# --- Myna's own schema -----------------------------------------------------------------------------------------------


def myna_post(i: int, **fields) -> dict:
    return new_post(
        str(i), f"post {i}", f"raw.jsonl:{i}", created_at=datetime(2020, 1, 1, tzinfo=UTC), **fields
    )


def test_jsonl_wrong_types_name_the_field(tmp_path):
    good = myna_post(1, like_count=3, hashtags=["a"])
    bad = [
        {**good, "like_count": "3"},
        {**good, "hashtags": "a"},
        {**good, "created_at": "yesterday"},
        {**good, "id": 5},
        {**good, "colour": "red"},
        {**good, "text": "   "},
    ]
    path = tmp_path / "posts.jsonl"
    path.write_bytes(b"".join(orjson.dumps(p) + b"\n" for p in [good, *bad]))
    assert detect_format(path) == "jsonl"
    posts, rejects = read_all(path)
    assert posts == [good]
    reasons = [r.reason for r in rejects]
    assert reasons[0].startswith("like_count: expected a 64-bit integer")
    assert reasons[1].startswith("hashtags: expected a list of strings")
    assert reasons[2].startswith("created_at: unrecognised date")
    assert reasons[3].startswith("id: expected a non-empty string")
    assert reasons[4].startswith("unknown field 'colour'")
    assert reasons[5] == "empty text"
    assert [r.line for r in rejects] == [2, 3, 4, 5, 6, 7]


def test_json_array_of_myna_posts_is_read_as_records(tmp_path):
    posts = [myna_post(i, like_count=i, hashtags=["a"]) for i in range(500)]
    pretty = tmp_path / "x.json"
    pretty.write_text(json.dumps(posts, indent=2, default=str))  # as json.dump(posts, f, indent=2) writes it
    one_line = tmp_path / "posts.json.gz"
    one_line.write_bytes(gzip.compress(orjson.dumps(posts)))
    for path in (pretty, one_line):
        assert detect_format(path) == "jsonl"
        assert read_all(path) == (posts, [])


def test_json_lines_with_a_broken_first_line_lose_only_that_line(tmp_path):
    v2 = (API / "v2" / "geo_tweets.jsonl").read_bytes().splitlines()
    myna = [orjson.dumps(myna_post(i)) for i in range(3)]
    files = {
        "cut.jsonl": (v2[0][:300] + b"\n" + b"\n".join(v2), "v2"),  # the first record cut mid-object
        "log.jsonl": (b"HTTP/1.1 200 OK\n" + b"\n".join(v2), "v2"),  # a line that is not JSON at all
        "posts.jsonl": (b'{"id": "9", "text": \n' + b"\n".join(myna), "jsonl"),
    }
    for name, (data, fmt) in files.items():
        path = tmp_path / name
        path.write_bytes(data + b"\n")
        assert detect_format(path) == fmt
        posts, rejects = read_all(path)
        assert len(posts) == 3
        assert [(r.line, r.reason.split(":")[0]) for r in rejects] == [(1, "invalid JSON")]


def test_a_big_single_line_array_streams_in_bounded_memory(tmp_path):
    n = 20_000
    url = "https://example.org/" + "x" * 1000  # about 1.3 KB a post: 27 MB on one line
    path = tmp_path / "big.json"
    path.write_bytes(orjson.dumps([myna_post(i, urls=[url]) for i in range(n)]))
    tracemalloc.start()
    kept = sum(not isinstance(item, Reject) for item in read_posts(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert kept == n
    assert peak < 8 << 20  # a chunk and a record, never the whole array


def test_parquet_round_trip_and_schema_check(tmp_path):
    posts = [myna_post(i, lang="en", urls=["https://x.org"]) for i in range(5000)]
    path = tmp_path / "posts.parquet"
    pq.write_table(posts_to_table(posts), path, row_group_size=1000)
    assert detect_format(path) == "parquet"
    assert read_all(path) == (posts, [])
    wrong = pa.table({"id": ["1"], "text": ["t"], "like_count": ["3"]})
    pq.write_table(wrong, path)
    _, [reject] = read_all(path)
    assert reject.reason.startswith("like_count: expected a 64-bit integer")
    pq.write_table(pa.table({"id": ["1"], "body": ["t"]}), path)
    with pytest.raises(
        InputFileError, match=r"not the Post schema: unknown columns \['body'\], missing \['text'\]"
    ):
        read_all(path)


def test_conversations_are_detected_not_read(tmp_path):
    path = tmp_path / "threads.jsonl"
    path.write_text('{"id": "t1", "turns": [{"role": "customer", "text": "hi"}]}\n')
    assert detect_format(path) == "conversations"
    with pytest.raises(ValueError, match="conversations"):
        read_posts(path)


# --- bad input never crashes -----------------------------------------------------------------------------------------


def zstd_blocks(data: bytes) -> bytes:
    """zstd as a streaming writer makes it: a block flushed every 16 KB."""
    writer = zstandard.ZstdCompressor().compressobj()
    blocks = [
        writer.compress(data[i : i + 16384]) + writer.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        for i in range(0, len(data), 16384)
    ]
    return b"".join(blocks) + writer.flush()


@pytest.mark.parametrize("compress", [gzip.compress, zstd_blocks])
def test_truncated_compressed_stream_keeps_what_was_readable(tmp_path, compress):
    texts = [t.replace("\n", " ") for t in archive_texts()] * 200
    blob = compress("\n".join(texts).encode() + b"\n")
    path = tmp_path / "posts.txt.gz"
    path.write_bytes(blob[:-20])  # an interrupted download: the last block and the stream's end are missing
    posts, rejects = read_all(path)
    assert len(texts) * 0.9 < len(posts) < len(texts)
    assert [p["text"] for p in posts] == texts[: len(posts)]
    [reject] = rejects
    assert reject.reason == "truncated gzip/zstd stream"
    assert reject.line == len(posts) + 1


def test_50mb_single_line_is_rejected_in_bounded_memory(tmp_path):
    path = tmp_path / "huge.jsonl"
    good = orjson.dumps(myna_post(2))
    with open(path, "wb") as f:
        f.write(b'{"id": "1", "text": "')
        for _ in range(50):
            f.write(b"a" * (1 << 20))
        f.write(b'"}\n' + good + b"\n")
    tracemalloc.start()
    posts, rejects = read_all(path, "jsonl")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [p["id"] for p in posts] == ["2"]
    assert [(r.line, r.reason) for r in rejects] == [(1, f"record too large (over {8 << 20} bytes)")]
    assert peak < 24 << 20  # chunks and the limit, never the 50 MB line


def test_oversized_element_in_json_array_is_skipped(tmp_path):
    statuses = json.loads((API / "v1" / "public_timeline.json").read_text())
    statuses[1]["text"] = "x" * (3 << 20)
    path = tmp_path / "timeline.json"
    path.write_text(json.dumps(statuses, indent=2))
    tracemalloc.start()
    posts, rejects = read_all(path, options=ReadOptions(max_record_bytes=1 << 20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(posts) == 19 and posts[1]["source"].endswith(":3")
    assert [(r.line, r.reason) for r in rejects] == [(2, f"record too large (over {1 << 20} bytes)")]
    assert peak < 8 << 20


def test_invalid_utf8_nul_and_deep_nesting_become_rejects(tmp_path):
    good = orjson.dumps(myna_post(1))
    lines = [
        good,
        b'{"id": "2", "text": "caf\xe9", "source": "s"}',  # latin-1 byte
        b'{"id": "3", "text": "a\x00b", "source": "s"}',  # raw NUL: not valid JSON
        b'{"id": "4", "text": "a\\u0000b", "source": "s"}',  # escaped NUL
        b"[" * 5000 + b"]" * 5000,
        b'{"id": "5", "text": ',  # cut
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert detect_format(path) == "jsonl"
    posts, rejects = read_all(path)
    assert [p["id"] for p in posts] == ["1"]
    assert [r.line for r in rejects] == [2, 3, 4, 5, 6]
    assert rejects[0].reason.startswith("invalid UTF-8")
    assert rejects[1].reason.startswith("invalid JSON")
    assert rejects[2].reason == "NUL character in text"
    assert rejects[3].reason.startswith("invalid JSON")  # orjson's depth limit
    text_path = tmp_path / "bad.txt"
    text_path.write_bytes(b"fine\ncaf\xe9\nnul\x00here\n")
    posts, rejects = read_all(text_path)
    assert [p["text"] for p in posts] == ["fine"]
    assert [(r.line, r.reason.split(":")[0]) for r in rejects] == [
        (2, "invalid UTF-8"),
        (3, "NUL character in text"),
    ]


def test_deeply_nested_element_in_document(tmp_path):
    path = tmp_path / "deep.json"
    status = (API / "v1" / "get_status.json").read_bytes()
    path.write_bytes(b"[" + status + b"," + b"[" * 5000 + b"]" * 5000 + b"," + status + b"]")
    posts, rejects = read_all(path)
    assert len(posts) == 2
    assert [r.line for r in rejects] == [2] and rejects[0].reason.startswith("invalid JSON")


def test_broken_document_structure(tmp_path):
    path = tmp_path / "cut.json"
    statuses = (API / "v1" / "public_timeline.json").read_bytes()
    path.write_bytes(statuses[: len(statuses) // 2])
    posts, rejects = read_all(path)
    assert 5 < len(posts) < 20
    [reject] = rejects
    assert reject.line == len(posts) + 1 and reject.reason.startswith("broken JSON document")


def test_empty_files_yield_nothing(tmp_path):
    for name in ("e.jsonl", "e.json", "e.csv", "e.txt", "e.js", "e.parquet", "e.jsonl.gz"):
        path = tmp_path / name
        path.write_bytes(gzip.compress(b"") if name.endswith(".gz") else b"")
        assert detect_format(path) in FORMATS
        for fmt in FORMATS[:-1]:
            if fmt != "parquet" or not name.endswith(".gz"):  # a gzip file is not a parquet file
                assert read_all(path, fmt) == ([], [])


def test_unknown_content_raises_clear_error(tmp_path):
    binary = tmp_path / "photo.jpg"
    binary.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(ValueError, match=r"photo\.jpg: binary content"):
        detect_format(binary)
    other_json = tmp_path / "config.json"
    other_json.write_text('{"learning_rate": 0.1, "layers": 12}\n')
    with pytest.raises(ValueError, match=r"config\.json: JSON that matches no post format"):
        detect_format(other_json)
    with pytest.raises(ValueError, match="unknown format"):
        read_posts(other_json, "xml")


# --- properties -----------------------------------------------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1).filter(
    lambda t: not t.isspace()
)
_ids = st.text(string.ascii_letters + string.digits + ":_-", min_size=1, max_size=20)
_maybe_str = st.none() | st.text(max_size=20)
_count = st.none() | st.integers(-(2**63), 2**63 - 1)
_posts = st.builds(
    new_post,
    id=_ids,
    text=_text,
    source=st.text(min_size=1, max_size=40),
    author_id=_maybe_str,
    created_at=st.none() | st.datetimes(timezones=st.just(UTC)),
    lang=_maybe_str,
    conversation_id=_maybe_str,
    in_reply_to_id=_maybe_str,
    quoted_id=_maybe_str,
    repost_of_id=_maybe_str,
    like_count=_count,
    repost_count=_count,
    reply_count=_count,
    quote_count=_count,
    hashtags=st.lists(st.text(max_size=10), max_size=3),
    mentions=st.lists(st.text(max_size=10), max_size=3),
    urls=st.lists(st.text(max_size=30), max_size=3),
)
_fast = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_fast
@given(st.lists(_posts, max_size=20))
def test_property_myna_jsonl_round_trip(posts):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "posts.jsonl"
        path.write_bytes(b"".join(orjson.dumps(p) + b"\n" for p in posts))
        assert read_all(path, "jsonl") == (posts, [])
        parquet = Path(tmp) / "posts.parquet"
        pq.write_table(pa.Table.from_pylist(posts, schema=POST_SCHEMA), parquet)
        assert read_all(parquet, "parquet") == (posts, [])


_prefixes = st.sampled_from([b"", b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"[", b"{", b"window.YTD.x = [", b"PAR1"])


@_fast
@given(_prefixes, st.binary(max_size=400) | st.text(max_size=200).map(str.encode))
def test_property_arbitrary_bytes_give_rejects_or_an_error_naming_the_file(prefix, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.bin"
        path.write_bytes(prefix + data)
        for fmt in FORMATS[:-1]:
            try:
                for item in read_posts(path, fmt, ReadOptions(max_record_bytes=64)):
                    assert isinstance(item, Reject) or item.keys() == set(POST_SCHEMA.names)
            except InputFileError as e:  # unusable as a whole: e.g. not Parquet, or a CSV with no text column
                assert e.path == str(path)
        try:
            assert detect_format(path) in FORMATS
        except InputFileError as e:
            assert e.path == str(path)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@_fast
@given(st.lists(_json, max_size=8), st.sampled_from([None, 0, 2]), st.integers(1, 64), st.booleans())
def test_property_splitter_yields_the_array_elements(array, indent, chunk_size, ascii_only):
    whole = json.dumps(array, indent=indent, ensure_ascii=ascii_only).encode()
    chunks = [whole[i : i + chunk_size] for i in range(0, len(whole), chunk_size)]
    assert [json.loads(raw) for raw in split_json_document(chunks)] == json.loads(whole)
    single = json.dumps({"statuses": array}).encode()  # a document that is not an array is one record
    assert [json.loads(raw) for raw in split_json_document([single])] == [json.loads(single)]
