"""Search results in the terminal: the post with its matches in bold, author, time, engagement, ids, and with
--explain the parts of its score."""

from datetime import UTC, datetime

from rich.console import Console
from rich.markup import escape

from myna.search.ask import Answer
from myna.search.rank import Hit, Results

out = Console(highlight=False, soft_wrap=True)


def marked(text: str, spans: list[list[int]]) -> str:
    parts, at = [], 0
    for start, end in spans:
        parts += [escape(text[at:start]), "[bold yellow]", escape(text[start:end]), "[/]"]
        at = end
    return "".join(parts) + escape(text[at:])


def when(seconds: int | None) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M") if seconds is not None else "?"


def print_hit(n: int, h: Hit, explain: bool) -> None:
    p = h.post
    head = f"[bold]{n:>2}.[/] @{escape(p['author'] or '?')}  {when(p['created_at'])}  ♥ {p['likes']}  ⟳ {p['reposts']}"
    out.print(head + f"  ↩ {p['replies']}  [dim]id {escape(p['id'])}  score {h.score:.3f}[/]")
    out.print("    " + marked(p["text"], h.highlights).replace("\n", "\n    "))
    if h.collapsed:
        out.print(f"    [dim]{len(h.collapsed)} repost(s) folded in: {escape(', '.join(h.collapsed[:5]))}[/]")
    if explain:
        out.print("    [dim]" + escape("  ".join(f"{k}={v}" for k, v in h.parts.items())) + "[/]")


def print_results(r: Results, explain: bool = False) -> None:
    how = " + ".join(r.retrievers)
    out.print(f"[dim]{r.order}: {len(r.hits)} shown of {r.total_candidates} candidates ({how})[/]")
    for n, h in enumerate(r.hits, start=1):
        print_hit(n, h, explain)


def print_answer(a: Answer) -> None:
    out.print(f"[dim]searched: {escape(a.query or '(no content words)')}[/]")
    out.print(escape(a.text) or "[dim](no answer)[/]")
    if a.removed_citations:
        out.print(f"[dim]{a.removed_citations} citation(s) of posts that were not retrieved removed[/]")
    for n, h in enumerate(a.posts, start=1):
        mark = "cited" if n in a.cited else "not cited"
        out.print(
            f"[bold][{n}][/] [dim]{mark}[/] @{escape(h.post['author'] or '?')}: {escape(h.post['text'][:200])}"
        )


SHOWCASE = (  # searches the bundled sample answers well: a tag, words with an operator, a phrase, Latest
    ("#earthquake", "top"),
    ("flood OR flooding lang:en -filter:links", "top"),
    ('"red cross"', "latest"),
)
SHOWCASE_QUESTION = "What are people saying about the floods in Calgary?"


def showcase(index_path, chat_run) -> None:
    """`myna speedrun`'s tour of search: a few searches and one answer that cites posts."""
    from myna.infer.chat import ChatSession, Turn
    from myna.infer.engine import Engine, SamplingParams
    from myna.runs import load_model
    from myna.search.ask import ask, search_tool
    from myna.search.index import SearchIndex, load_embedder
    from myna.search.rank import search
    from myna.search.tool import TOOL

    idx = SearchIndex.open(index_path)
    embedder = load_embedder(idx.path, idx.meta)
    for text, order in SHOWCASE:
        out.print(f"\n[bold]myna search --index {index_path} --order {order} -n 3 {escape(repr(text))}[/]")
        print_results(search(idx, text, order=order, limit=3, embedder=embedder))
    out.print(f"\n[bold]myna ask --index {index_path} --ckpt {chat_run} {escape(repr(SHOWCASE_QUESTION))}[/]")
    loaded = load_model(chat_run)
    with Engine(loaded.model, loaded.tokenizer, max_batch=1) as engine:
        print_answer(ask(idx, SHOWCASE_QUESTION, engine, embedder, max_tokens=96))
        # the same question in the chat, where the model decides to search (SFT learned it from the made dialogues)
        out.print(
            f"\n[bold]myna chat --ckpt {chat_run} --index {index_path}[/]\nyou> {escape(SHOWCASE_QUESTION)}"
        )
        tools = {TOOL: search_tool(idx, embedder, loaded.tokenizer)}
        session = ChatSession(engine, SamplingParams(max_tokens=96, temperature=0), tools=tools)
        turn = Turn()
        reply = "".join(session.respond(SHOWCASE_QUESTION, turn))
        out.print(f"myna> {escape(reply)}")
        for note in turn.notes or ["the model answered without calling search"]:
            out.print(f"  [dim]\\[{escape(note)}][/]")
