"""The ad server in `myna serve --ads`: /v1/ads/match and /v1/ads/click on a live server with the bundled sample
inventory and the tiny SFT run, and the web page's Ads tab in Chromium."""

from pathlib import Path

import pytest
from helpers import ARTIFACTS
from live_server import KEY, LiveServer, error_of
from playwright.sync_api import expect

from myna.moderation import Policy
from myna.serve.api import create_app
from myna.serve.config import ServeConfig

INVENTORY = Path(__file__).resolve().parent.parent / "data" / "sample" / "ads" / "inventory.jsonl"
COFFEE = "Need an espresso before this meeting, coffee please #coffee"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def ad_server(sft_run: Path, tmp_path_factory):
    config = ServeConfig(
        api_key=KEY, policy=Policy.off(), ads=INVENTORY, ads_log=tmp_path_factory.mktemp("adlog")
    )
    server = LiveServer(create_app(sft_run, config))
    server.wait_ready()
    yield server
    server.stop()


def test_match_records_and_clicks(ad_server):
    body = {"text": COFFEE, "user": "u1", "lang": "en", "time": "2026-12-07T12:00:00Z", "record": True}
    r = ad_server.request("POST", "/v1/ads/match", body, AUTH)
    assert r.status == 200, r.body
    result = r.json()
    assert result["object"] == "ads.match" and result["winner"]["ad"].startswith("brewhaus-")
    assert 0 < result["price"] <= result["winner"]["bid"] and result["currency"] == "USD"
    outcomes = {c["outcome"] for c in result["candidates"]}
    assert outcomes <= {"won", "lost", "blocked"} and all(c["reason"] for c in result["candidates"])
    assert sum(c["outcome"] == "won" for c in result["candidates"]) == 1
    # every brand-safety decision is a record: the post's scores, tier, rule, model version, and the decision
    (record,) = result["brand_safety"]["records"]
    assert {"post_id", "model_version", "scores", "tier", "rule", "unscored", "reason"} <= set(record)
    assert len(record["scores"]) == 11 and record["model_version"].startswith("run/step_")
    decision = result["brand_safety"]["decisions"]["standard"]
    assert decision["allowed"] and decision["reason"] and decision["record"]["post_id"] == record["post_id"]
    click = ad_server.request("POST", "/v1/ads/click", {"impression_id": result["impression_id"]}, AUTH)
    assert click.status == 200 and click.json()["object"] == "ads.click"
    again = ad_server.request("POST", "/v1/ads/click", {"impression_id": result["impression_id"]}, AUTH)
    assert again.status == 400 and "already clicked" in error_of(again)["message"]
    assert ad_server.health()["ads"] == {"ads": 30, "ready": True}


@pytest.mark.parametrize(
    "body, message",
    [
        ({"text": COFFEE, "texts": [COFFEE]}, 'give "text"'),
        ({"kind": "tweet", "text": COFFEE}, "kind: expected one of"),
        ({"text": COFFEE, "lang": "english"}, "lang: expected an ISO 639-1 code"),
        ({"text": COFFEE, "time": "yesterday"}, "time: expected ISO-8601"),
        ({"kind": "feed", "texts": [COFFEE, COFFEE], "slot": 9}, "slot: a feed position 0..2"),
        ({"text": COFFEE, "bid": 3}, "unknown field 'bid'"),
    ],
)
def test_bad_match_requests_name_the_field(ad_server, body, message):
    r = ad_server.request("POST", "/v1/ads/match", body, AUTH)
    assert r.status == 400 and message in error_of(r)["message"]


def test_without_ads_the_endpoints_say_how_to_enable_them(sft_run: Path):
    server = LiveServer(create_app(sft_run, ServeConfig(policy=Policy.off())))
    try:
        server.wait_ready()
        r = server.request("POST", "/v1/ads/match", {"text": COFFEE})
        assert r.status == 404 and "--ads" in error_of(r)["message"]
    finally:
        server.stop()


def test_ads_tab_shows_the_winner_and_every_candidate(ad_server, page):
    page.goto(ad_server.url + "/")
    page.click("#settings summary")
    page.fill("#api_key", KEY)
    page.click('.tab[data-tab="ads"]')
    expect(page.locator("#tab-chat")).to_be_hidden()
    page.fill("#ads-text", COFFEE)
    page.fill("#ads-lang", "en")
    page.click("#ads-go")
    expect(page.locator("#ads-winner .ad-label")).to_contain_text("Brewhaus")
    expect(page.locator("#ads-winner .ad-price")).to_contain_text("second-price")
    expect(page.locator("#ads-summary")).to_contain_text("brand safety of the context: low")
    rows = page.locator("#ads-candidates tbody tr")
    expect(rows.first).to_have_class("won")
    assert rows.count() >= 2 and all(r.locator("td").last.inner_text() for r in rows.all())
    page.screenshot(path=str(ARTIFACTS / "web_ads.png"))
    # a feed: the slot's neighbours are the context, and a bad slot is the server's error, shown
    page.select_option("#ads-kind", "feed")
    page.fill("#ads-text", f"{COFFEE}\nmorning run done")
    page.fill("#ads-slot", "7")
    page.click("#ads-go")
    expect(page.locator("#ads-error")).to_contain_text("slot: a feed position 0..2")
    expect(page.locator("#ads-candidates")).to_be_hidden()


def test_server_moderation_runs_the_policys_model_rules(sft_run: Path):
    """A moderation policy with an example-similarity category is bound to the served model: a request that says
    the example is refused, which no keyword of the policy could have caught."""
    policy = Policy.from_dict(
        {
            "extends": "none",
            "categories": {
                "lookalike": {
                    "action": "block",
                    "examples": ["the zebra stampede is coming"],
                    "similarity": 0.99,
                }
            },
        }
    )
    server = LiveServer(create_app(sft_run, ServeConfig(policy=policy)))
    try:
        server.wait_ready()
        said = {"model": "run", "max_tokens": 4}
        r = server.request(
            "POST",
            "/v1/chat/completions",
            {**said, "messages": [{"role": "user", "content": "the zebra stampede is coming"}]},
        )
        assert r.status == 200 and r.json()["choices"][0]["finish_reason"] == "content_filter", r.body
        ok = server.request(
            "POST", "/v1/chat/completions", {**said, "messages": [{"role": "user", "content": "hello"}]}
        )
        assert ok.json()["choices"][0]["finish_reason"] != "content_filter"
    finally:
        server.stop()
