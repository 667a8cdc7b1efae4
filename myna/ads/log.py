"""The impression and click log: Parquet part files in a folder, and the state matching reads back from it.

    LOG/2026-11-05/part-<unix ns>-<pid>-<random>.parquet     one file per write, rows of LOG_SCHEMA

Each write is a new file, written under a temporary name and renamed, so nothing already written is touched and a
killed writer leaves at most a hidden temporary file (readers skip names that start with '.'). Folders are UTC
days, by each event's own time: budgets and frequency caps run on UTC days.

Matching state is rebuilt from these files alone, never kept elsewhere, so separate processes (two `myna ads match`
runs, a server and a CLI) see each other's impressions: spend a campaign made today, impressions a user saw from a
campaign today, and every ad's impressions and clicks for its predicted click rate. AdLog.refresh reads only files
it has not read yet; the match's day and the day before are listed again on every refresh, older days once.

Clicks name the impression they follow (impression_id). A CPM campaign pays for each impression when it is shown
(charge = price / 1000), a CPC campaign for each click (charge = price), so a day's spend is the sum of its rows'
charges. Files are not trusted: a part with another schema, too many rows, a bad value or a time outside its day
raises AdLogError naming the file.
"""

import math
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from myna.io import atomic_path

LOG_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("event", pa.string(), nullable=False),  # "impression" or "click"
        pa.field("impression_id", pa.string(), nullable=False),  # an impression's own id, or the one clicked
        pa.field("time", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("ad", pa.string(), nullable=False),
        pa.field("campaign", pa.string(), nullable=False),
        pa.field("user", pa.string()),  # null for anonymous contexts
        pa.field("context_kind", pa.string(), nullable=False),
        pa.field("bid_type", pa.string(), nullable=False),
        pa.field(
            "price", pa.float64(), nullable=False
        ),  # the auction's price, per 1000 impressions or per click
        pa.field("charge", pa.float64(), nullable=False),  # what this event cost the campaign
        pa.field("relevance", pa.float64(), nullable=False),
        pa.field("pctr", pa.float64(), nullable=False),  # the predicted click rate the auction used
    ]
)
EVENTS = ("impression", "click")
MAX_PART_BYTES = 64 << 20  # a part is one write (a click, a batch of impressions); larger is not ours
MAX_PART_ROWS = 1_000_000
CLICK_WINDOW = timedelta(days=1)  # a click later than this after its impression is not credited to the ad
SPEND_DECIMALS = 9  # a CPM price in millionths, per impression: sums are exact when rounded back to this
PRIOR_CTR = 0.01  # the click rate assumed before the log holds any: a typical feed ad's
PRIOR_IMPRESSIONS = 100  # the prior's weight: an ad's own rate dominates after about a hundred impressions
_DAY_FORMAT = "%Y-%m-%d"


class AdLogError(ValueError):
    """A log file that cannot be used; the message names it and what was expected."""


class ClickError(ValueError):
    """A click that cannot be credited: unknown or too old impression, or one already clicked."""


@dataclass
class _Day:
    """One UTC day's state: what each campaign spent, what each user saw, and the impressions clicks refer to."""

    parts: set = field(default_factory=set)  # "day/part" of the day's parts taken in
    spend: Counter = field(default_factory=Counter)  # campaign -> CURRENCY
    seen: Counter = field(default_factory=Counter)  # (campaign, user) -> impressions
    impressions: dict = field(default_factory=dict)  # impression id -> its row, for clicks
    clicked: set = field(default_factory=set)  # impression ids already clicked


class AdLog:
    """A log folder and the state read from it so far. Not thread-safe: give each thread its own, or a lock."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.days: dict[date, _Day] = {}  # the match's day and the day before (see refresh)
        self.counted: set[str] = set()  # "day/part" of the parts whose rows are in the click-rate counts
        self.swept: set[date] = set()  # older days listed once for click rates
        # every day's impressions and clicks, for click rates: by ad, and over the whole network
        self.ad_impressions: Counter = Counter()
        self.ad_clicks: Counter = Counter()
        self.impressions_total = self.clicks_total = 0

    # --- writing ---

    def record_impression(
        self,
        *,
        ad: str,
        campaign: str,
        user: str | None,
        context_kind: str,
        bid_type: str,
        price: float,
        relevance: float,
        pctr: float,
        at: datetime,
    ) -> str:
        """Log that an ad was shown at `price` (per 1000 impressions or per click); returns the impression id."""
        impression_id = uuid.uuid4().hex
        charge = price / 1000 if bid_type == "cpm" else 0.0
        row = dict(
            event_id=impression_id,
            event="impression",
            impression_id=impression_id,
            time=at,
            ad=ad,
            campaign=campaign,
            user=user,
            context_kind=context_kind,
            bid_type=bid_type,
            price=price,
            charge=charge,
            relevance=relevance,
            pctr=pctr,
        )
        self._write(row)
        return impression_id

    def record_click(self, impression_id: str, at: datetime) -> str:
        """Log a click on an impression shown at most CLICK_WINDOW before; returns the click's id. A CPC campaign
        pays its price for it, once: a second click on the same impression is refused."""
        self.refresh(at)
        today = _utc(at).date()
        for day in (today, today - timedelta(days=1)):
            state = self.days.get(day)
            shown = state.impressions.get(impression_id) if state else None
            if shown is not None and shown["time"] <= at <= shown["time"] + CLICK_WINDOW:
                break
        else:
            raise ClickError(f"no impression {impression_id!r} in the {CLICK_WINDOW} before {at.isoformat()}")
        if any(impression_id in s.clicked for s in self.days.values()):
            raise ClickError(f"impression {impression_id!r} was already clicked")
        charge = shown["price"] if shown["bid_type"] == "cpc" else 0.0
        row = {**shown, "event_id": uuid.uuid4().hex, "event": "click", "time": at, "charge": charge}
        self._write(row)
        return row["event_id"]

    def _write(self, row: dict) -> None:
        folder = self.folder / _utc(row["time"]).strftime(_DAY_FORMAT)
        name = f"part-{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        with atomic_path(folder / name) as tmp:
            pq.write_table(pa.Table.from_pylist([row], schema=LOG_SCHEMA), tmp)

    # --- reading ---

    def refresh(self, now: datetime) -> None:
        """Take in the parts written since the last refresh. The day of `now` and the day before are listed on
        every refresh (other processes write there); older days once, for click rates only."""
        today = _utc(now).date()
        recent = (today, today - timedelta(days=1))
        self.days = {d: s for d, s in self.days.items() if d in recent}
        try:
            with os.scandir(self.folder) as entries:
                folders = [e for e in entries if e.is_dir()]
        except FileNotFoundError:
            return
        for folder in folders:
            day = _folder_day(folder.name)
            if day is None or (day not in recent and day in self.swept):
                continue
            state = self.days.setdefault(day, _Day()) if day in recent else None
            if state is None:
                self.swept.add(day)
            done = self.counted if state is None else state.parts
            for name in os.listdir(folder.path):
                key = f"{folder.name}/{name}"
                if not name.endswith(".parquet") or name.startswith(".") or key in done:
                    continue
                rows = read_part(Path(folder.path) / name, day)
                if key not in self.counted:
                    self.counted.add(key)
                    self._count(rows)
                if state is not None:
                    state.parts.add(key)
                    _apply(state, rows)

    def _count(self, rows: list[dict]) -> None:
        for r in rows:
            if r["event"] == "impression":
                self.ad_impressions[r["ad"]] += 1
                self.impressions_total += 1
            else:
                self.ad_clicks[r["ad"]] += 1
                self.clicks_total += 1

    # --- state for matching ---

    def spend(self, campaign: str, now: datetime) -> float:
        """CURRENCY the campaign spent on the UTC day of `now`."""
        state = self.days.get(_utc(now).date())
        return round(state.spend[campaign], SPEND_DECIMALS) if state else 0.0

    def impressions(self, campaign: str, user: str, now: datetime) -> int:
        """Impressions the user saw from the campaign on the UTC day of `now`."""
        state = self.days.get(_utc(now).date())
        return state.seen[(campaign, user)] if state else 0

    def predicted_ctr(self, ads: list[str]) -> np.ndarray:
        """Each ad's click rate, shrunk towards the network's (empirical Bayes with a fixed prior weight): an ad
        never shown gets the network's rate, one shown often its own. An honest start, not a learned model."""
        clicks, shown = (
            self.clicks_total + PRIOR_CTR * PRIOR_IMPRESSIONS,
            self.impressions_total + PRIOR_IMPRESSIONS,
        )
        network = clicks / shown
        n = np.array([self.ad_impressions[a] for a in ads], np.float64)
        c = np.array([self.ad_clicks[a] for a in ads], np.float64)
        return (c + network * PRIOR_IMPRESSIONS) / (n + PRIOR_IMPRESSIONS)


def read_part(path: Path, day: date) -> list[dict]:
    """A part's rows, checked: the schema, the size, the events, the amounts and that every time is in `day`."""
    try:
        size = path.stat().st_size
        if size > MAX_PART_BYTES:
            raise AdLogError(f"{path}: {size} bytes; a log part has at most {MAX_PART_BYTES}")
        meta = pq.ParquetFile(path).metadata
        if meta.num_rows > MAX_PART_ROWS:
            raise AdLogError(f"{path}: {meta.num_rows} rows; a log part has at most {MAX_PART_ROWS}")
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise AdLogError(f"{path}: not a readable Parquet file ({e})") from None
    if not table.schema.equals(LOG_SCHEMA):
        raise AdLogError(
            f"{path}: not an ads log part: expected the columns {LOG_SCHEMA.names} with their types"
        )
    rows = table.to_pylist()
    for i, r in enumerate(rows):
        problem = _row_problem(r, day)
        if problem:
            raise AdLogError(f"{path}: row {i}: {problem}")
    return rows


def _row_problem(r: dict, day: date) -> str | None:
    for name in ("event_id", "event", "impression_id", "time", "ad", "campaign", "context_kind", "bid_type"):
        if r[name] is None:
            return f"{name} is null"
    if r["event"] not in EVENTS:
        return f"event {r['event']!r}; expected one of {EVENTS}"
    if r["bid_type"] not in ("cpm", "cpc"):
        return f"bid_type {r['bid_type']!r}; expected cpm or cpc"
    for name in ("price", "charge", "relevance", "pctr"):
        if r[name] is None or not math.isfinite(r[name]) or r[name] < 0:
            return f"{name} {r[name]!r}; expected a finite number >= 0"
    if r["time"].date() != day:
        return f"time {r['time'].isoformat()} is not in the folder's day {day}"
    return None


def _apply(state: _Day, rows: list[dict]) -> None:
    for r in rows:
        state.spend[r["campaign"]] += r["charge"]
        if r["event"] == "impression":
            state.seen[(r["campaign"], r["user"])] += 1
            state.impressions[r["impression_id"]] = r
        else:
            state.clicked.add(r["impression_id"])


def _folder_day(name: str) -> date | None:
    try:
        return datetime.strptime(name, _DAY_FORMAT).date()
    except ValueError:
        return None


def _utc(t: datetime) -> datetime:
    if t.tzinfo is None:
        # a naive time would be read as this machine's local time, and land in the wrong UTC day
        raise ValueError(f"{t.isoformat()}: expected a timezone-aware time")
    return t.astimezone(UTC)
