"""The ads commands' output for a person: a match's winner and every candidate's fate, ad copy with its rejects,
brand-safety records, the offline evaluation. `--json` prints the same data whole for a program."""

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _console() -> Console:
    # piped output has no width to fit: wide enough for a table of candidates with their reasons
    console = Console()
    return console if console.is_terminal else Console(width=160)


def print_match(result: dict, console: Console | None = None) -> None:
    out = console or _console()
    w = result["winner"]
    if w is None:
        out.print("[bold]no ad[/bold]: no candidate passed its filters and the reserve")
    else:
        out.print(
            f"[bold green]winner[/] {escape(w['ad'])} ({escape(w['advertiser'])}) pays "
            f"{result['price']:.4f} {result['currency']} {result['price_unit']}: {escape(w['text'])}"
        )
    if "impression_id" in result:
        out.print(f"impression {result['impression_id']} logged")
    table = Table(
        title=f"{len(result['candidates'])} of {result['considered']} ads retrieved", title_justify="left"
    )
    for col in ("outcome", "ad", "relevance", "emb/kw/topic", "bid", "pCTR", "eCPM", "score", "why"):
        table.add_column(col, overflow="fold")
    for c in result["candidates"]:
        parts = c["relevance_parts"]
        table.add_row(
            c["outcome"],
            escape(c["ad"]),
            f"{c['relevance']:.3f}",
            f"{parts['embedding']:.2f}/{parts['keywords']:.2f}/{parts['topics']:.0f}",
            f"{c['bid']:g} {c['bid_type']}",
            f"{c['pctr']:.4f}",
            f"{c['ecpm']:.3f}",
            f"{c['score']:.3f}",
            escape(f"{c['code']}: {c['reason']}"),
        )
    out.print(table)


def print_copy(written: dict, console: Console | None = None) -> None:
    out = console or _console()
    for n, text in enumerate(written["accepted"], start=1):
        out.print(f"[bold]{n}.[/bold] {escape(text)}  [dim]({len(text)} characters)[/dim]")
    if written["rejected"]:
        counts = ", ".join(f"{reason} {count}" for reason, count in sorted(written["rejected"].items()))
        out.print(f"[dim]rejected: {counts}[/dim]")


def print_records(records: list[dict], console: Console | None = None) -> None:
    out = console or _console()
    table = Table()
    for col in ("post", "tier", "rule", "top scores"):
        table.add_column(col, overflow="fold")
    for r in records:
        top = sorted(r["scores"].items(), key=lambda kv: -kv[1])[:3]
        scores = ", ".join(f"{k} {v:.2f}" for k, v in top if v > 0) or "-"
        table.add_row(escape(r["post_id"]), r["tier"], escape(r["rule"] or "-"), scores)
    out.print(table)
    unscored = sorted({c for r in records for c in r["unscored"]})
    if unscored:
        out.print(f"[yellow]not scored (no model or no classifier): {', '.join(unscored)}[/yellow]")


# A tour of the ad server for `myna speedrun`: contexts like the sample's posts, each matched with its reasons
SHOWCASE = (
    {"text": "Need an espresso before this exam, coffee please #coffee", "lang": "en", "user": "u1"},
    {
        "text": "Flood water in our street, we need supplies and a go bag #yycflood",
        "lang": "en",
        "user": "u2",
    },
    {
        "kind": "feed",
        "texts": ["booked flights to the coast!", "isis claims the bombing, dozens killed"],
        "slot": 1,
        "lang": "en",
    },
)


def showcase(inventory, chat_run, log) -> None:
    """Open the example inventory with the chat run's model and show a few matches, each with every candidate's
    fate (the third is a feed slot under a post about a terrorist attack: brand safety decides)."""
    from myna.ads.service import match, match_request, open_matcher
    from myna.search.index import Embedder

    out = _console()
    matcher = open_matcher(inventory, Embedder.load(chat_run), log, cache=log / "cache")
    for body in SHOWCASE:
        line = " | ".join(body.get("texts") or [body["text"]])
        out.print(f"\n[bold]myna ads match --inventory {inventory} --ckpt {chat_run}[/bold] ({escape(line)})")
        print_match(match(matcher, match_request(body)), out)
