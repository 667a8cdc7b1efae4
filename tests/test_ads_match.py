"""Ads inventory, matching and auction with real parts: inventories written as JSONL here, the shared tiny base's
embeddings, a Parquet log in a temporary folder, and a small keyword brand-safety scorer (a real function)."""

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from myna.ads import inventory as inv
from myna.ads.auction import clearing_price
from myna.ads.inventory import CATEGORIES, InventoryError, load_inventory
from myna.ads.log import LOG_SCHEMA, AdLog, AdLogError, ClickError, read_part
from myna.ads.match import BrandSafetyCheck, Context, Matcher, paced_budget
from myna.search.index import Embedder

SAMPLE_INVENTORY = Path(__file__).resolve().parent.parent / "data" / "sample" / "ads" / "inventory.jsonl"
NOW = datetime(2026, 11, 5, 12, 0, tzinfo=UTC)


# --- a brand-safety scorer and judge with the interface of myna/ads/safety.py ---

SAFETY_WORDS = {"war": ("death_and_conflict", 0.6), "massacre": ("death_and_conflict", 0.9)}
TIERS = ("low", "medium", "high")
ALLOWED = {"conservative": ("low",), "standard": ("low", "medium"), "relaxed": TIERS}


@dataclass
class Record:
    scores: dict
    unscored: list
    tier: str


@dataclass
class Decision:
    allowed: bool
    reason: str


def keyword_scores(texts: list[str], ids: list[str]) -> list[Record]:
    records = []
    for text in texts:
        scores = dict.fromkeys(CATEGORIES, 0.0)
        for word, (category, score) in SAFETY_WORDS.items():
            if word in text.lower().split():
                scores[category] = max(scores[category], score)
        top = max(scores.values())
        records.append(Record(scores, [], "high" if top >= 0.8 else "medium" if top >= 0.5 else "low"))
    return records


def keyword_judge(suitability: str, records: list[Record]) -> Decision:
    worst = max((r.tier for r in records), key=TIERS.index)
    return Decision(worst in ALLOWED[suitability], f"the context is {worst}")


SAFETY = BrandSafetyCheck(keyword_scores, keyword_judge)


# --- inventories ---


def campaign(id: str, **fields) -> dict:
    return {
        "kind": "campaign",
        "id": id,
        "advertiser": f"{id} Ltd (fictional)",
        "bid_type": "cpm",
        "bid": 5.0,
        "daily_budget": 100,
        "start": "2026-01-01T00:00:00Z",
        "end": "2027-01-01T00:00:00Z",
        **fields,
    }


def ad(id: str, campaign: str, text: str, keywords: list[str], **fields) -> dict:
    url = f"https://{campaign}.example/{id}"
    return {
        "kind": "ad",
        "id": id,
        "campaign": campaign,
        "text": text,
        "url": url,
        "keywords": keywords,
        **fields,
    }


def write(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def embedder(base_run: Path) -> Embedder:
    return Embedder.load(base_run)


def matcher(tmp_path: Path, records: list, embedder: Embedder, **kw) -> Matcher:
    tmp_path.mkdir(parents=True, exist_ok=True)
    inventory = load_inventory(write(tmp_path / "inventory.jsonl", records))
    return Matcher(inventory, embedder, SAFETY, AdLog(tmp_path / "log"), **kw)


def post(text: str, user: str | None = "u1", at: datetime = NOW, lang: str | None = "en") -> Context:
    return Context("post", (text,), lang=lang, user=user, time=at)


def outcomes(result) -> dict[str, tuple[str, str]]:
    return {c.ad.id: (c.outcome, c.code) for c in result.candidates}


# --- inventory ---


def test_inventory_errors_name_line_and_field_and_nothing_loads(tmp_path):
    good = campaign("good")
    path = write(
        tmp_path / "bad.jsonl",
        [
            good,  # 1
            campaign("precise", bid=0.12345),  # 2
            campaign("cpa", bid_type="cpa"),  # 3
            campaign("backwards", start="2026-05-01T00:00:00Z", end="2026-04-01T00:00:00Z"),  # 4
            campaign("naive", start="2026-01-01T00:00:00"),  # 5
            campaign("lang", languages=["english"]),  # 6
            campaign("cat", excluded_categories=["violence"]),  # 7
            campaign("suit", suitability="strict"),  # 8
            campaign("typo", budget=10),  # 9
            ad("a1", "good", "Coffee.", ["coffee"]),  # 10
            ad("a1", "good", "Coffee again.", ["coffee"]),  # 11
            ad("a2", "nowhere", "Tea.", ["tea"]),  # 12
            "{not json",  # 13
            ad("a3", "good", "x" * 300, []),  # 14
            ad("a4", "good", "Fine.", [], url="ftp://files.example/x"),  # 15
            campaign("good"),  # 16
            campaign("neg", daily_budget=-5),  # 17
            campaign("nan", bid="NaN"),  # 18
            ad("a5", "good", "Fine.", [], pad="z" * 20_000),  # 19
            ad("a6", "precise", "Its campaign has an error, reported once.", []),  # 20
        ],
    )
    with pytest.raises(InventoryError) as e:
        load_inventory(path)
    errors = "\n".join(e.value.errors)
    expected = [
        (2, "bid", "at most 4 decimals"),
        (3, "bid_type", "'cpm', 'cpc'"),
        (4, "end", "is not after start"),
        (5, "start", "no UTC offset"),
        (6, "languages[0]", "ISO 639-1"),
        (7, "excluded_categories[0]", "categories among"),
        (8, "suitability", "'conservative'"),
        (9, "budget", "unknown field"),
        (11, "id", "duplicate ad id"),
        (12, "campaign", "no campaign with id 'nowhere'"),
        (13, "line", "not a JSON object"),
        (14, "text", "at most 280"),
        (15, "url", "http(s) URL"),
        (16, "id", "duplicate campaign id 'good' (first on line 1)"),
        (17, "daily_budget", "positive amount"),
        (18, "bid", "expected a number"),
    ]
    for line, field, words in expected:
        assert f"{path}:{line}: {field}: " in errors and words in errors, (line, field, errors)
    assert f"{path}:19: record too large" in errors and f"{path}:20:" not in errors
    assert "nothing loaded" in str(e.value)


def test_inventory_bounds_and_the_sample(tmp_path, monkeypatch):
    big = write(tmp_path / "big.jsonl", [campaign("c"), ad("a", "c", "Hello.", [])])
    monkeypatch.setattr(inv, "MAX_FILE_BYTES", 100)
    with pytest.raises(InventoryError, match="at most 100 are read"):
        load_inventory(big)
    monkeypatch.undo()
    with pytest.raises(InventoryError, match="no ads"):
        load_inventory(write(tmp_path / "empty.jsonl", [campaign("c")]))

    sample = load_inventory(SAMPLE_INVENTORY)
    assert len(sample.ads) == 30 and all(
        c.advertiser.endswith("(fictional)") for c in sample.campaigns.values()
    )
    assert all(".example/" in a.url for a in sample.ads)


# --- relevance and filters ---


TOPICAL = [
    campaign("brew", bid_type="cpc", bid=0.5),
    ad(
        "brew-1",
        "brew",
        "Fresh roasted coffee beans at your door every week.",
        ["coffee", "espresso", "cold brew"],
    ),
    campaign("quiz"),
    ad(
        "quiz-1",
        "quiz",
        "Turn your notes into flashcards before the exam.",
        ["exam", "chemistry", "flashcards"],
    ),
    campaign("spoke"),
    ad("spoke-1", "spoke", "A light road bike for weekend rides.", ["bike", "cycling", "road bike"]),
    campaign("paw", bid_type="cpc", bid=0.4),
    ad("paw-1", "paw", "Puppy food that grows with them.", ["puppy", "dog", "dog food"]),
]


def test_relevance_picks_the_on_topic_ad(tmp_path, embedder):
    m = matcher(tmp_path, TOPICAL, embedder)
    for text, expected, matched in [
        ("chemistry exam tomorrow and I have not started", "quiz-1", ["exam", "chemistry"]),
        ("first #ColdBrew of the summer", "brew-1", ["cold brew"]),
        ("took the new bike out for a long ride", "spoke-1", ["bike"]),
    ]:
        result = m.match(post(text))
        assert result.winner is not None and result.winner.ad.id == expected, text
        assert result.winner.matched["keywords"] == matched
        assert result.winner.parts["keywords"] == min(1.0, len(matched) / 2)
        # every candidate is the winner, a loser or blocked, with a reason
        assert all(c.outcome in ("won", "lost", "blocked") and c.reason for c in result.candidates)


def test_every_filter_blocks_with_its_reason(tmp_path, embedder):
    text = "one more coffee before the war documentary"
    words = ["coffee"]
    records = [
        campaign("open"),
        ad("open-1", "open", "Coffee for everyone.", words),
        campaign("later", start="2026-12-01T00:00:00Z"),
        ad("later-1", "later", "Coffee in December.", words),
        campaign("over", start="2026-01-01T00:00:00Z", end="2026-02-01T00:00:00Z"),
        ad("over-1", "over", "Coffee in January.", words),
        campaign("french", languages=["fr"]),
        ad("french-1", "french", "Du café.", words),
        campaign("tea", target_topics=["tea"]),
        ad("tea-1", "tea", "Coffee or tea.", words),
        campaign("broke", bid_type="cpc", bid=2.0, daily_budget=1),
        ad("broke-1", "broke", "Coffee on credit.", words),
        campaign("careful", suitability="conservative"),
        ad("careful-1", "careful", "Coffee, carefully.", words),
        campaign("peaceful", excluded_categories=["death_and_conflict"]),
        ad("peaceful-1", "peaceful", "Coffee in peace.", words),
    ]
    result = matcher(tmp_path, records, embedder).match(post(text))
    got = outcomes(result)
    assert got["open-1"] == ("won", "won")
    assert got["later-1"] == ("blocked", "schedule") and got["over-1"] == ("blocked", "schedule")
    assert got["french-1"] == ("blocked", "language")
    assert got["tea-1"] == ("blocked", "topics")
    assert got["broke-1"] == ("blocked", "budget")
    assert got["careful-1"] == ("blocked", "brand_safety")
    assert got["peaceful-1"] == ("blocked", "excluded_category")
    reasons = {c.ad.id: c.reason for c in result.candidates}
    assert "starts 2026-12-01" in reasons["later-1"] and "ended 2026-02-01" in reasons["over-1"]
    assert "targets fr; the context is in en" in reasons["french-1"]
    assert "death_and_conflict is excluded and the context scores 0.60" in reasons["peaceful-1"]
    # an unknown language cannot satisfy a language target
    unknown = matcher(tmp_path / "u", records, embedder).match(post(text, lang=None))
    assert "unknown language" in next(c.reason for c in unknown.candidates if c.ad.id == "french-1")

    d = result.to_dict()
    json.dumps(d)  # JSON-ready: no numpy numbers, no datetimes
    assert (
        d["winner"]["ad"] == "open-1" and d["currency"] == "USD" and d["price_unit"] == "per 1000 impressions"
    )
    assert d["auction"] == {"kind": "second-price", "reserve_cpm": 0.5}
    assert {c["outcome"] for c in d["candidates"]} == {"won", "blocked"}
    assert set(d["candidates"][0]["relevance_parts"]) == {"embedding", "keywords", "topics"}


# --- the auction ---


def test_clearing_price_arithmetic():
    # CPM: the winner (relevance 0.5) needs eCPM 3 / 0.5 = 6 to tie the runner-up's score 3
    assert clearing_price("cpm", 10.0, 0.01, 0.5, 3.0, 0.5) == 6.0
    # CPC: eCPM 4 / 0.8 = 5 per 1000 impressions at pCTR 1% is 0.5 a click
    assert clearing_price("cpc", 1.0, 0.01, 0.8, 4.0, 0.5) == 0.5
    # alone: the reserve, converted to a click price; never more than the bid
    assert clearing_price("cpc", 1.0, 0.01, 0.8, 0.0, 0.5) == 0.05
    assert clearing_price("cpm", 0.6, 0.01, 0.1, 0.5, 0.5) == 0.6


def test_second_price_and_reserve(tmp_path, embedder):
    # the same text and keywords: equal relevance, so the bids alone order them
    same = ("Coffee beans, roasted today.", ["coffee", "beans"])
    records = [
        campaign("high", bid=9.0),
        ad("high-1", "high", *same),
        campaign("mid", bid=6.0),
        ad("mid-1", "mid", *same),
        campaign("low", bid=1.0),
        ad("low-1", "low", *same),
        campaign("click", bid_type="cpc", bid=0.4),
        ad("click-1", "click", *same),
    ]
    result = matcher(tmp_path, records, embedder).match(post("coffee beans"))
    by_ad = {c.ad.id: c for c in result.candidates}
    assert len({round(c.relevance, 9) for c in result.candidates}) == 1
    assert result.winner.ad.id == "high-1"
    # second price: it pays the runner-up's eCPM (equal relevance), not its own 9
    assert result.winner.price == 6.0 and "runner-up" in result.winner.reason
    # the CPC ad's eCPM is bid * pCTR * 1000 at the prior click rate
    assert by_ad["click-1"].ecpm == pytest.approx(0.4 * 0.01 * 1000)
    assert [c.ad.id for c in result.candidates] == ["high-1", "mid-1", "click-1", "low-1"]
    assert by_ad["mid-1"].code == "outbid" and "under the winner's" in by_ad["mid-1"].reason

    # a reserve of 7 CPM: only the top bid clears it and pays the reserve
    reserved = matcher(tmp_path / "r", records, embedder, reserve_cpm=7.0).match(post("coffee beans"))
    assert outcomes(reserved)["mid-1"] == ("lost", "reserve")
    assert reserved.winner.ad.id == "high-1" and reserved.winner.price == 7.0
    assert "the reserve 7 CPM" in reserved.winner.reason
    # a reserve over every bid: no winner
    assert (
        matcher(tmp_path / "n", records, embedder, reserve_cpm=50.0).match(post("coffee beans")).winner
        is None
    )


# --- budgets, caps and the log ---


def test_pacing_throttles_a_campaign_ahead_of_its_day(tmp_path, embedder):
    # bid 10 CPM at a reserve of 10: each impression costs exactly 0.01 of a 0.1 daily budget
    records = [
        campaign("fast", bid=10.0, daily_budget=0.1),
        ad("fast-1", "fast", "Coffee, fast.", ["coffee"]),
    ]
    m = matcher(tmp_path, records, embedder, reserve_cpm=10.0)
    morning = datetime(
        2026, 11, 5, 6, 36, tzinfo=UTC
    )  # 27.5% of the day: 0.1 * (0.275 + 0.05) = 0.0325 allowed
    assert paced_budget(m.inventory.campaigns["fast"], morning) == (
        pytest.approx(0.0325),
        pytest.approx(0.275),
    )
    shown = 0
    while (result := m.match(post("coffee", user=f"u{shown}", at=morning))).winner is not None:
        m.record_impression(result)
        shown += 1
    assert shown == 3
    blocked = result.candidates[0]
    assert blocked.code == "pacing" and "spent 0.0300 USD; 0.0325 allowed so far" in blocked.reason
    # later in the day the curve allows more, up to the budget itself
    evening = morning.replace(hour=23)
    while (result := m.match(post("coffee", user=f"u{shown}", at=evening))).winner is not None:
        m.record_impression(result)
        shown += 1
    assert shown == 10 and result.candidates[0].code == "budget"
    # a new UTC day starts from nothing
    assert m.match(post("coffee", at=evening + timedelta(hours=2))).winner is not None


def test_frequency_cap_holds_across_matchers_sharing_a_log(tmp_path, embedder):
    records = [campaign("capped", frequency_cap=2), ad("capped-1", "capped", "Coffee again.", ["coffee"])]
    path = write(tmp_path / "inventory.jsonl", records)
    inventory = load_inventory(path)
    a = Matcher(inventory, embedder, SAFETY, AdLog(tmp_path / "log"), cache_dir=tmp_path / "cache")

    calls = []

    def counting(texts):
        calls.append(len(texts))
        return embedder(texts)

    counting.fingerprint = embedder.fingerprint
    # the second matcher (another process, in effect) reads the ads' vectors from the cache
    b = Matcher(load_inventory(path), counting, SAFETY, AdLog(tmp_path / "log"), cache_dir=tmp_path / "cache")
    assert calls == [] and np.array_equal(a.relevance.vectors, b.relevance.vectors)

    a.record_impression(a.match(post("coffee", user="ann")))
    b.record_impression(b.match(post("coffee", user="ann")))
    for m in (a, b):
        capped = m.match(post("coffee", user="ann"))
        assert capped.winner is None and capped.candidates[0].code == "frequency_cap"
        assert "user ann saw it 2 times today (cap 2)" in capped.candidates[0].reason
        assert m.match(post("coffee", user="bob")).winner is not None
        assert m.match(post("coffee", user="ann", at=NOW + timedelta(days=1))).winner is not None


def test_log_round_trips_through_parquet_and_clicks_change_pctr(tmp_path, embedder):
    records = [
        campaign("clicky", bid_type="cpc", bid=0.5),
        ad("clicky-1", "clicky", "Coffee you will click.", ["coffee"]),
        ad("clicky-2", "clicky", "Coffee you will not.", ["coffee"]),
    ]
    m = matcher(tmp_path, records, embedder)
    before = m.log.predicted_ctr(["clicky-1", "clicky-2"])
    assert list(before) == [0.01, 0.01]
    result = m.match(post("coffee"))
    impression = m.record_impression(result)
    click = m.log.record_click(impression, NOW + timedelta(minutes=1))
    with pytest.raises(ClickError, match="already clicked"):
        m.log.record_click(impression, NOW + timedelta(minutes=2))
    with pytest.raises(ClickError, match="no impression"):
        m.log.record_click("feedface", NOW)

    parts = sorted((tmp_path / "log" / "2026-11-05").glob("*.parquet"))
    rows = [r for p in parts for r in read_part(p, NOW.date())]
    assert [r["event"] for r in rows] == ["impression", "click"]
    assert rows[1]["event_id"] == click and rows[1]["impression_id"] == impression == rows[0]["event_id"]
    assert rows[0]["ad"] == result.winner.ad.id and rows[0]["time"] == NOW
    # CPC: the impression is free, the click costs the auction's price
    assert rows[0]["charge"] == 0 and rows[1]["charge"] == rows[0]["price"] == result.winner.price

    # a fresh reader (another process) rebuilds spend and click rates from the files alone
    fresh = AdLog(tmp_path / "log")
    fresh.refresh(NOW)
    assert fresh.spend("clicky", NOW) == result.winner.price
    winner, other = result.winner.ad.id, ({"clicky-1", "clicky-2"} - {result.winner.ad.id}).pop()
    # an advertiser never bids against itself: alone, it pays the reserve, 0.5 CPM at a 1% click rate per click
    assert outcomes(result)[other] == ("lost", "same_campaign") and result.winner.price == 0.05
    after = fresh.predicted_ctr([winner, other])
    # one click in one impression: the winner's rate rises above the prior, the network's with it
    assert after[0] > after[1] > 0.01

    # files are not trusted: another schema, or not Parquet, is an error naming the file
    wrong = tmp_path / "log" / "2026-11-05" / "part-wrong.parquet"
    pq.write_table(pa.table({"ad": ["x"]}), wrong)
    with pytest.raises(AdLogError, match="part-wrong.parquet: not an ads log part"):
        AdLog(tmp_path / "log").refresh(NOW)
    wrong.write_bytes(b"not parquet")
    with pytest.raises(AdLogError, match="part-wrong.parquet: not a readable Parquet file"):
        AdLog(tmp_path / "log").refresh(NOW)
    wrong.unlink()
    misfiled = tmp_path / "log" / "2026-11-04" / "part-x.parquet"
    misfiled.parent.mkdir()
    row = {**rows[0], "time": NOW}
    pq.write_table(pa.Table.from_pylist([row], schema=LOG_SCHEMA), misfiled)
    with pytest.raises(AdLogError, match="not in the folder's day 2026-11-04"):
        AdLog(tmp_path / "log").refresh(NOW)


# --- scale ---


def test_ten_thousand_ads_are_embedded_once_and_match(tmp_path, embedder):
    words = [f"w{i:03d}" for i in range(400)]
    rng = np.random.default_rng(0)
    records = []
    for c in range(1000):
        records.append(campaign(f"c{c}", bid=round(float(rng.uniform(1, 9)), 2)))
        for a in range(10):
            kws = [str(w) for w in rng.choice(words, 3, replace=False)]
            records.append(ad(f"a{c}-{a}", f"c{c}", f"Deals on {' and '.join(kws)} from shop {c}.", kws))
    # the only ad about zeppelins bids the most, so no other ad's embedding alone can outscore it
    records.append(campaign("zep", bid=9.0, target_topics=["zeppelin"]))
    records.append(ad("zep-1", "zep", "Zeppelin rides over the bay.", ["zeppelin", "airship"]))
    calls = []

    def counting(texts):
        calls.append(len(texts))
        return embedder(texts)

    counting.fingerprint = embedder.fingerprint
    m = matcher(tmp_path, records, counting)
    assert calls == [10_001] and m.relevance.vectors.shape == (10_001, embedder.dim)

    start = time.perf_counter()
    results = [m.match(post(f"a zeppelin airship ride, day {i}", user=f"u{i}")) for i in range(20)]
    per_match = (time.perf_counter() - start) / 20
    assert calls == [10_001] + [1] * 20  # one context a match, the ads never again
    assert all(r.winner.ad.id == "zep-1" for r in results)
    assert all(r.considered == 10_001 and len(r.candidates) <= 100 for r in results)
    assert per_match < 1.0, per_match  # milliseconds in practice; this only catches per-ad Python loops


def test_the_safety_module_plugs_in(tmp_path, embedder):
    """myna/ads/safety.py's BrandSafety (keyword rules, no model) and judge fit BrandSafetyCheck."""
    from myna.ads.safety import BrandSafety, judge

    check = BrandSafetyCheck(BrandSafety.load().score, judge)
    records = [campaign("std"), ad("std-1", "std", "Coffee for everyone.", ["coffee"])]
    inventory = load_inventory(write(tmp_path / "inventory.jsonl", records))
    m = Matcher(inventory, embedder, check, AdLog(tmp_path / "log"))
    assert m.match(post("coffee and a good book")).winner.ad.id == "std-1"
    blocked = m.match(post("coffee and porn all day"))
    assert blocked.winner is None and blocked.candidates[0].code == "brand_safety"
