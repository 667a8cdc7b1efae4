"""`myna serve`'s settings: create_app and serve take them, and the command's flags default to them."""

from dataclasses import dataclass
from pathlib import Path

from myna.moderation import Policy


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # the address to listen on; loopback: only this machine can connect
    port: int = 8000  # the port to listen on
    api_key: str | None = None  # the bearer key /v1 requires (myna serve: else $MYNA_API_KEY); None: no key
    allowed_hosts: tuple[str, ...] = ()  # without a key, Host names answered besides loopback ones ("*": any)
    max_concurrency: int = 32  # requests in flight; one more gets 429 before its body is parsed
    max_batch: int | None = (
        None  # the engine's batch rows; None: max_concurrency, all in flight decode together
    )
    max_body_bytes: int = 1 << 20  # a larger request body gets 413
    body_timeout: float = 30.0  # seconds for a request's body to arrive, or 408
    header_timeout: float = 10.0  # seconds for a request's headers to arrive, or the connection is closed
    policy: Policy | None = None  # moderation: a JSON/TOML file, 'default' or 'off'; None: Policy.default()
    device: str = "cpu"  # where the model runs: cpu, cuda, cuda:1 ...
    index: Path | None = None  # a search index (myna index build) for /v1/search, /v1/ask and the Search tab
    ads: Path | None = None  # an ads inventory (JSONL) for /v1/ads/match, /v1/ads/click and the Ads tab
    ads_log: Path = Path("runs/ads")  # the impression and click log (Parquet), with the ads' embedding cache
    ads_policy: Path | None = None  # the brand-safety policy; None: myna/ads/brand_safety.json
    compile: bool = False  # torch.compile the decode step: a warm-up of seconds, then faster tokens (README)
    log_level: str = "info"  # uvicorn's

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        for name in ("body_timeout", "header_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
