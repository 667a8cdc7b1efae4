"""The ad server behind `myna serve --ads INVENTORY`: /v1/ads/match and /v1/ads/click over one Matcher.

The inventory is read and checked when the server starts (a bad one stops it with the file's errors); its ads are
embedded by the served run's model once that has loaded (cached beside the log). One match at a time: the
matcher's log state is shared, and a match takes tens of milliseconds.
"""

import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from myna.ads.inventory import load_inventory
from myna.ads.log import ClickError
from myna.ads.service import match, match_request, open_matcher
from myna.runs import Loaded
from myna.search.index import Embedder
from myna.serve.protocol import invalid


class AdDesk:
    def __init__(self, inventory: Path, log: Path, policy: Path | None):
        load_inventory(inventory)  # errors now, before the model loads
        self.inventory, self.log, self.policy = inventory, log, policy
        self.lock = threading.Lock()
        self.matcher = None

    def attach(self, loaded: Loaded) -> None:
        """Runs in the server's loading thread: the ads embedded and brand safety scored by the served model."""
        self.matcher = open_matcher(
            self.inventory, Embedder.of(loaded), self.log, self.policy, self.log / "cache"
        )

    def describe(self) -> dict:
        m = self.matcher
        return {"ads": None if m is None else len(m.inventory.ads), "ready": m is not None}

    def match(self, body: dict) -> dict:
        try:
            request = match_request(body)
        except ValueError as e:
            raise invalid(str(e)) from e
        with self.lock:
            result = match(self.matcher, request)
        return {"id": f"adm-{uuid.uuid4().hex}", "object": "ads.match", "created": int(time.time()), **result}

    def click(self, body: dict) -> dict:
        impression = body.get("impression_id")
        if set(body) != {"impression_id"} or not isinstance(impression, str):
            raise invalid('expected {"impression_id": "..."} (the id a match with "record": true returned)')
        with self.lock:
            try:
                click = self.matcher.log.record_click(impression, datetime.now(UTC))
            except ClickError as e:
                raise invalid(str(e), "impression_id") from e
        return {"id": click, "object": "ads.click", "impression_id": impression}
