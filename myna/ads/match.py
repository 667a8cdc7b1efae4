"""Matching: which ad, if any, to show in a context, at what price, and why every candidate won, lost or was blocked.

    context -> every ad's relevance (relevance.py) -> the CANDIDATES most relevant, each at least MIN_RELEVANCE
            -> filters, each blocking with its reason -> the auction among the rest (auction.py) -> MatchResult

A candidate is blocked by the first of these that applies, in this order:

    schedule           the context's time is outside the campaign's start..end
    language           the campaign names languages and the context's is not one of them (or is unknown)
    topics             the campaign names target topics and the context mentions none
    budget             one more charge (bid/1000 for CPM, the bid for CPC) would pass today's spend over the budget
    pacing             ... would pass what the day so far allows: budget * (share of the day gone + PACING_SLACK)
    frequency_cap      the user saw the campaign's ads frequency_cap times today (contexts without a user: no cap)
    brand_safety       the context's tier is not one the campaign's suitability allows (BrandSafetyCheck.judge)
    excluded_category  the context scores EXCLUDED_SCORE or more in a category the campaign excludes, or that
                       category was not scored
The others bid: those under the reserve lose ("reserve"), and so does every ad but the best of its campaign
("same_campaign": an advertiser never bids against itself, which would raise its own price); the highest score
wins, the rest lose ("outbid").

Spend, impressions and click rates come from the log folder (log.py), refreshed before every match, so matchers
in other processes that share the folder count the same impressions. Days are UTC days.
"""

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from datetime import time as clock
from pathlib import Path
from typing import Protocol

import numpy as np

from myna.ads.auction import RESERVE_CPM, clearing_price, expected_cpm
from myna.ads.inventory import CURRENCY, LANGUAGES, Ad, Campaign, Inventory
from myna.ads.log import SPEND_DECIMALS, AdLog
from myna.ads.relevance import W_EMBEDDING, W_KEYWORDS, W_TOPICS, AdRelevance, Scores
from myna.search.index import Embedder

CONTEXT_KINDS = ("post", "query", "user", "feed")  # a post read, a search, a user's recent posts, a feed slot
MAX_CONTEXT_TEXTS = 20  # a user's recent posts or a slot's neighbours; more dilutes the average embedding
MAX_CONTEXT_CHARS = 10_000  # search indexes no more of a post than this
MAX_USER_CHARS = 128
CANDIDATES = 100  # ads retrieved a match: deep enough that blocked ones rarely crowd out every eligible one
# one matched keyword or topic (0.2) is enough; an embedding alone must reach a centred cosine of 0.375
MIN_RELEVANCE = 0.15
PACING_SLACK = 0.05  # share of the budget that may run ahead of the clock, so a campaign serves from midnight
EXCLUDED_SCORE = 0.5  # the default policy's medium tier for most categories: what a reviewer would flag
DECIMALS = 6  # in to_dict: millionths, as prices are kept


class SafetyRecord(Protocol):
    """What matching reads of a context post's brand-safety record (myna/ads/safety.py's SafetyRecord)."""

    scores: Mapping[str, float]  # category -> score in [0, 1]
    unscored: Sequence[str]  # categories no model scored


class SafetyDecision(Protocol):
    allowed: bool
    reason: str


@dataclass(frozen=True)
class BrandSafetyCheck:
    """How contexts are judged: `score(texts, ids)` rates each text, `judge(suitability, records)` decides for one
    suitability setting. myna/ads/safety.py provides both: BrandSafetyCheck(BrandSafety.load(...).score, judge)."""

    score: Callable[[list[str], list[str]], Sequence[SafetyRecord]]
    judge: Callable[[str, Sequence[SafetyRecord]], SafetyDecision]


@dataclass(frozen=True)
class Context:
    """Where an ad would be shown: kind (CONTEXT_KINDS), its texts (one for a post or a query; a user's recent
    posts; a feed slot's neighbouring posts), its language (ISO 639-1, None if unknown), the viewer and the time."""

    kind: str
    texts: tuple[str, ...]
    lang: str | None = None
    user: str | None = None
    time: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        if self.kind not in CONTEXT_KINDS:
            raise ValueError(f"kind: expected one of {', '.join(CONTEXT_KINDS)}, got {self.kind!r}")
        if isinstance(self.texts, str) or not isinstance(self.texts, tuple | list):
            raise ValueError("texts: expected a list of strings")
        object.__setattr__(self, "texts", tuple(self.texts))
        most = 1 if self.kind in ("post", "query") else MAX_CONTEXT_TEXTS
        if not 1 <= len(self.texts) <= most:
            raise ValueError(f"texts: a {self.kind} context has 1..{most} texts, got {len(self.texts)}")
        for i, text in enumerate(self.texts):
            if not isinstance(text, str) or not text.strip() or len(text) > MAX_CONTEXT_CHARS:
                raise ValueError(
                    f"texts[{i}]: expected non-empty text of at most {MAX_CONTEXT_CHARS} characters"
                )
        if self.lang is not None and self.lang not in LANGUAGES:
            raise ValueError(f"lang: expected an ISO 639-1 code such as 'en', got {self.lang!r}")
        if self.user is not None and (
            not isinstance(self.user, str) or not 0 < len(self.user) <= MAX_USER_CHARS
        ):
            raise ValueError(f"user: expected an id of 1..{MAX_USER_CHARS} characters")
        if not isinstance(self.time, datetime) or self.time.tzinfo is None:
            raise ValueError("time: expected a timezone-aware datetime")


@dataclass
class Candidate:
    """One retrieved ad: its relevance and bid, and what became of it (outcome, code, reason, price if it won)."""

    ad: Ad
    campaign: Campaign
    relevance: float
    parts: dict[str, float]  # embedding, keywords, topics: each part before its weight
    matched: dict[str, list[str]]  # the keywords and the topics found in the context
    pctr: float
    ecpm: float
    score: float  # ecpm * relevance
    outcome: str = ""  # "won", "lost" or "blocked"
    code: str = ""  # the filter that blocked it, "reserve" or "outbid" for a loss, "won"
    reason: str = ""
    price: float | None = None  # the winner's, in its bid's unit

    def to_dict(self) -> dict:
        return {
            "ad": self.ad.id,
            "campaign": self.campaign.id,
            "advertiser": self.campaign.advertiser,
            "outcome": self.outcome,
            "code": self.code,
            "reason": self.reason,
            "relevance": _round(self.relevance),
            "relevance_parts": {k: _round(v) for k, v in self.parts.items()},
            "matched": self.matched,
            "bid_type": self.campaign.bid_type,
            "bid": self.campaign.bid,
            "pctr": _round(self.pctr),
            "ecpm": _round(self.ecpm),
            "score": _round(self.score),
            "price": self.price,
        }


@dataclass
class MatchResult:
    context: Context
    winner: Candidate | None
    candidates: list[Candidate]  # the winner, the losers by score, then the blocked by relevance
    considered: int  # ads in the inventory
    reserve_cpm: float
    # the context's brand-safety records and decisions; None without candidates
    safety: "_Judged | None" = None

    def to_dict(self) -> dict:
        """JSON-ready: the winner and its price, and every candidate's outcome with the scores behind it."""
        w = self.winner
        return {
            "winner": None
            if w is None
            else {
                "ad": w.ad.id,
                "campaign": w.campaign.id,
                "advertiser": w.campaign.advertiser,
                "text": w.ad.text,
                "url": w.ad.url,
                "bid_type": w.campaign.bid_type,
                "bid": w.campaign.bid,
            },
            "price": None if w is None else w.price,
            "price_unit": None if w is None else _unit(w.campaign.bid_type),
            "currency": CURRENCY,
            "auction": {"kind": "second-price", "reserve_cpm": self.reserve_cpm},
            "relevance_weights": {"embedding": W_EMBEDDING, "keywords": W_KEYWORDS, "topics": W_TOPICS},
            "context": {
                "kind": self.context.kind,
                "texts": len(self.context.texts),
                "lang": self.context.lang,
                "user": self.context.user,
                "time": self.context.time.isoformat(),
            },
            "considered": self.considered,
            "candidates": [c.to_dict() for c in self.candidates],
            "brand_safety": None if self.safety is None else self.safety.to_dict(),
        }


class Matcher:
    """An inventory ready to match: its ads embedded once (cached in cache_dir when given), its log, its brand
    safety. Not thread-safe (the log state is shared): one per thread, or a lock around match."""

    def __init__(
        self,
        inventory: Inventory,
        embedder: Embedder,
        safety: BrandSafetyCheck,
        log: AdLog,
        cache_dir: Path | None = None,
        reserve_cpm: float = RESERVE_CPM,
    ):
        self.inventory, self.safety, self.log, self.reserve_cpm = inventory, safety, log, reserve_cpm
        self.relevance = AdRelevance.build(inventory, embedder, cache_dir)

    def match(self, context: Context) -> MatchResult:
        self.log.refresh(context.time)
        scores = self.relevance.score(context.texts)
        rows = _most_relevant(scores.relevance, MIN_RELEVANCE, CANDIDATES)
        pctr = self.log.predicted_ctr([self.inventory.ads[r].id for r in rows])
        candidates = [self._candidate(int(r), scores, float(p)) for r, p in zip(rows, pctr, strict=True)]
        judged = None
        if candidates:
            judged = _Judged.of(self.safety, context, {c.campaign.suitability for c in candidates})
            # every filter is the campaign's, so its ads share one verdict
            verdicts: dict[str, tuple[str, str] | None] = {}
            for c in candidates:
                if c.campaign.id not in verdicts:
                    verdicts[c.campaign.id] = self._blocked(c, context, judged)
                if verdicts[c.campaign.id]:
                    c.outcome, (c.code, c.reason) = "blocked", verdicts[c.campaign.id]
        winner = self._auction([c for c in candidates if not c.outcome])
        order = {"won": 0, "lost": 1, "blocked": 2}
        # the winner, the losers by score, the blocked by relevance (candidates are in relevance order)
        ranked = sorted(candidates, key=lambda c: (order[c.outcome], -c.score if c.outcome == "lost" else 0))
        return MatchResult(context, winner, ranked, len(self.inventory.ads), self.reserve_cpm, judged)

    def record_impression(self, result: MatchResult) -> str:
        """Log that the result's winner was shown; returns the impression id (for record_click)."""
        w = result.winner
        if w is None:
            raise ValueError("the match has no winner to record")
        return self.log.record_impression(
            ad=w.ad.id,
            campaign=w.campaign.id,
            user=result.context.user,
            context_kind=result.context.kind,
            bid_type=w.campaign.bid_type,
            price=w.price,
            relevance=w.relevance,
            pctr=w.pctr,
            at=result.context.time,
        )

    def _candidate(self, row: int, scores: Scores, pctr: float) -> Candidate:
        ad = self.inventory.ads[row]
        campaign = self.inventory.campaigns[ad.campaign]
        relevance = float(scores.relevance[row])
        ecpm = expected_cpm(campaign.bid_type, campaign.bid, pctr)
        return Candidate(
            ad=ad,
            campaign=campaign,
            relevance=relevance,
            parts={
                "embedding": float(scores.embedding[row]),
                "keywords": float(scores.keywords[row]),
                "topics": float(scores.topics[row]),
            },
            matched=scores.matched(row),
            pctr=pctr,
            ecpm=ecpm,
            score=ecpm * relevance,
        )

    def _blocked(self, c: Candidate, ctx: Context, judged: "_Judged") -> tuple[str, str] | None:
        """(code, reason) of the first filter that blocks the candidate, or None."""
        camp, now = c.campaign, ctx.time
        if now < camp.start:
            return "schedule", f"the campaign starts {camp.start.isoformat()}"
        if now >= camp.end:
            return "schedule", f"the campaign ended {camp.end.isoformat()}"
        if camp.languages and ctx.lang not in camp.languages:
            context_lang = f"in {ctx.lang}" if ctx.lang else "of unknown language"
            return "language", f"targets {', '.join(camp.languages)}; the context is {context_lang}"
        if camp.target_topics and not c.matched["topics"]:
            return "topics", f"targets {', '.join(camp.target_topics)}; the context mentions none"
        spend = self.log.spend(camp.id, now)
        # the most one event can cost: an impression at the full CPM bid, or a click at the full CPC bid
        charge = camp.bid / 1000 if camp.bid_type == "cpm" else camp.bid
        after = round(spend + charge, SPEND_DECIMALS)
        if after > camp.daily_budget:
            return "budget", f"spent {spend:.4f} of its daily {camp.daily_budget:g} {CURRENCY}"
        allowed, gone = paced_budget(camp, now)
        if after > allowed:
            return "pacing", (
                f"spent {spend:.4f} {CURRENCY}; {allowed:.4f} allowed so far ({gone:.0%} of its day gone "
                f"+ {PACING_SLACK:.0%} slack, of {camp.daily_budget:g})"
            )
        if camp.frequency_cap is not None and ctx.user is not None:
            seen = self.log.impressions(camp.id, ctx.user, now)
            if seen >= camp.frequency_cap:
                return (
                    "frequency_cap",
                    f"user {ctx.user} saw it {seen} times today (cap {camp.frequency_cap})",
                )
        decision = judged.decisions[camp.suitability]
        if not decision.allowed:
            return "brand_safety", f"{camp.suitability}: {decision.reason}"
        for category in camp.excluded_categories:
            if category in judged.unscored:
                return "excluded_category", f"{category} is excluded and the context was not scored for it"
            if judged.worst.get(category, 0.0) >= EXCLUDED_SCORE:
                return "excluded_category", (
                    f"{category} is excluded and the context scores {judged.worst[category]:.2f} "
                    f"(>= {EXCLUDED_SCORE})"
                )
        return None

    def _auction(self, bidding: list[Candidate]) -> Candidate | None:
        """Second price with quality among the unblocked (see auction.py); sets every bidder's outcome."""
        for c in bidding:
            if c.ecpm < self.reserve_cpm:
                c.outcome, c.code = "lost", "reserve"
                c.reason = f"eCPM {c.ecpm:.4f} is under the reserve {self.reserve_cpm:g} {CURRENCY}"
        # a stable sort: at equal scores the more relevant (earlier) candidate wins
        ranked = sorted((c for c in bidding if not c.outcome), key=lambda c: -c.score)
        best: dict[str, Candidate] = {}
        for c in ranked:
            if c.campaign.id in best:
                c.outcome, c.code = "lost", "same_campaign"
                c.reason = f"{best[c.campaign.id].ad.id} of the same campaign scored higher"
            else:
                best[c.campaign.id] = c
        ranked = list(best.values())
        if not ranked:
            return None
        winner = ranked[0]
        runner_up = ranked[1].score if len(ranked) > 1 else 0.0
        camp = winner.campaign
        winner.price = clearing_price(
            camp.bid_type, camp.bid, winner.pctr, winner.relevance, runner_up, self.reserve_cpm
        )
        if runner_up / winner.relevance > self.reserve_cpm:
            set_by = f"the runner-up's score {runner_up:.4f}"
        else:
            set_by = f"the reserve {self.reserve_cpm:g} CPM" + (
                "" if len(ranked) > 1 else ", no other bidder"
            )
        winner.outcome, winner.code = "won", "won"
        winner.reason = (
            f"highest score {winner.score:.4f}; pays {winner.price:g} {CURRENCY} {_unit(camp.bid_type)} "
            f"(bid {camp.bid:g}; set by {set_by})"
        )
        for c in ranked[1:]:
            c.outcome, c.code = "lost", "outbid"
            c.reason = f"score {c.score:.4f} under the winner's {winner.score:.4f}"
        return winner


@dataclass
class _Judged:
    """A context's brand safety, scored once a match: a decision for each suitability the candidates use, and the
    worst score of each category over the context's texts."""

    decisions: dict[str, SafetyDecision]
    worst: dict[str, float]
    unscored: set[str]
    records: list[SafetyRecord]  # one a context text: what every decision rests on

    def to_dict(self) -> dict:
        return {
            "records": [asdict(r) for r in self.records],
            "decisions": {s: asdict(d) for s, d in self.decisions.items()},
        }

    @classmethod
    def of(cls, safety: BrandSafetyCheck, ctx: Context, suitabilities: set[str]) -> "_Judged":
        texts = list(ctx.texts)
        # content addresses, so a scorer that caches by id never confuses two texts
        ids = [hashlib.sha256(t.encode("utf-8")).hexdigest()[:16] for t in texts]
        records = safety.score(texts, ids)
        worst: dict[str, float] = {}
        for r in records:
            for category, score in r.scores.items():
                worst[category] = max(worst.get(category, 0.0), score)
        unscored = {category for r in records for category in r.unscored}
        return cls(
            {s: safety.judge(s, records) for s in sorted(suitabilities)}, worst, unscored, list(records)
        )


def paced_budget(campaign: Campaign, now: datetime) -> tuple[float, float]:
    """What the campaign may have spent by `now` today, and the share of its day gone: its hours today are the UTC
    day cut to its schedule, and spend may lead them by PACING_SLACK of the budget."""
    midnight = datetime.combine(now.astimezone(UTC).date(), clock(), UTC)
    begin, end = max(midnight, campaign.start), min(midnight + timedelta(days=1), campaign.end)
    gone = min(1.0, max(0.0, (now - begin) / (end - begin)))
    return campaign.daily_budget * min(1.0, gone + PACING_SLACK), gone


def _most_relevant(relevance: np.ndarray, floor: float, k: int) -> np.ndarray:
    """Rows of the k most relevant ads at or above floor, most relevant first (ties in file order)."""
    rows = np.flatnonzero(relevance >= floor)
    if len(rows) > k:
        rows = np.sort(rows[np.argpartition(-relevance[rows], k - 1)[:k]])
    return rows[np.argsort(-relevance[rows], kind="stable")]


def _unit(bid_type: str) -> str:
    return "per 1000 impressions" if bid_type == "cpm" else "per click"


def _round(x: float) -> float:
    return round(float(x), DECIMALS)
