"""Answers that cite posts: retrieve, then the chat model answers from the top posts and cites them as [1], [2].

The retrieval is written into the conversation as a tool call, the way a model that calls tools sees it:

    system: how to answer                      user: the question
    assistant: <|tool_call|>{"name": "search", "arguments": {"query": ...}}
    tool: [1] @author (date): text  [2] ...     assistant: the answer, generated

so a model tuned on tool use sees exactly its training format, and one that is not still reads the posts as
context. A citation that points at no retrieved post ([7] of five) is removed from the answer and counted.
"""

import re
from dataclasses import dataclass, field

from myna.infer.chat import Tool, ToolResult
from myna.infer.engine import Engine, SamplingParams
from myna.search.index import Embedder, SearchIndex
from myna.search.query import QueryError, parse
from myna.search.rank import Hit, search
from myna.search.terms import terms
from myna.search.tool import POSTS, check_citations, format_posts, search_call
from myna.template import prompt_budget, render_prompt, turn_stop_ids
from myna.tokenizer import Tokenizer

SYSTEM = (
    "Answer the question from the posts the search returned. Cite every post you use by its number, like [1]. "
    "If the posts do not answer the question, say so."
)
# question words that would make every post a match (BM25 needs content words)
STOPWORDS = frozenset(
    "a an and are about at be by did do does for from has have how i in is it me of on or people "
    "say saying said that the their them there they this to was were what when where which who why "
    "will with you your tell think".split()
)


@dataclass
class Answer:
    question: str
    query: str  # what was searched
    text: str  # the answer, citations of posts that were not retrieved removed
    posts: list[Hit]  # the retrieved posts; [n] cites posts[n - 1]
    cited: list[int] = field(default_factory=list)  # the numbers cited, in order of first use
    removed_citations: int = 0  # citations that pointed at no retrieved post
    finish_reason: str = ""

    def to_dict(self) -> dict:
        return {
            "question": self.question,
            "query": self.query,
            "answer": self.text,
            "citations": [{"n": n, "post": self.posts[n - 1].post} for n in self.cited],
            "posts": [h.to_dict() for h in self.posts],
            "removed_citations": self.removed_citations,
            "finish_reason": self.finish_reason,
        }


def question_query(question: str) -> str:
    """A search query from a question: its operators kept, its content words joined by OR (a question's words
    rarely all appear in one post)."""
    words, operators = [], []
    for piece in question.split():
        piece = piece.rstrip("?!.,;")
        if re.match(r"^-?[A-Za-z_]+:\S+$", piece) and not piece.lower().startswith("http"):
            operators.append(piece)
            continue
        for t in terms(piece):
            if t not in STOPWORDS and t not in words and len(t) > 1:
                words.append(t)
    return " ".join([" OR ".join(f'"{w}"' for w in words[:8]), *operators]).strip()


def tool_result(hits: list[Hit]) -> str:
    return format_posts([h.post for h in hits])


def messages(question: str, query: str, hits: list[Hit]) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [search_call(query)]},
        {"role": "tool", "content": tool_result(hits) or "no posts found"},
    ]


@dataclass
class AskPrompt:
    """A question with its posts retrieved, as the chat model is asked it; answer() reads the model's reply."""

    question: str
    query: str  # what was searched ("" when the question held no content words)
    hits: list[Hit]  # the posts in the prompt, [n] = hits[n - 1]
    ids: list[int]
    params: SamplingParams

    def answer(self, text: str, finish_reason: str) -> Answer:
        text, cited, removed = check_citations(text, len(self.hits))
        return Answer(self.question, self.query, text, self.hits, cited, removed, finish_reason)


def ask_prompt(
    index: SearchIndex,
    question: str,
    tokenizer: Tokenizer,
    max_len: int,
    embedder: Embedder | None = None,
    query: str | None = None,
    k: int = POSTS,
    max_tokens: int = 160,
    temperature: float = 0.0,
) -> AskPrompt:
    """Retrieve the top k posts for the question (or the given query) and write the prompt that asks about them
    in a context of max_len tokens (fewer posts when they do not all fit)."""
    query = query or question_query(question)
    try:
        parse(query)
    except QueryError:
        query = ""
    hits = search(index, query, limit=k, embedder=embedder).hits if query else []
    budget = prompt_budget(max_len, max_tokens)
    while True:  # the question and the instructions stay whole: fewer posts when they do not fit
        prompt = render_prompt(messages(question, query, hits), tokenizer)
        if len(prompt.ids) <= budget or not hits:
            break
        hits = hits[:-1]
    if (
        len(prompt.ids) > budget
    ):  # a tiny context: no instructions, and the template's rule cuts the oldest turns
        prompt = render_prompt(messages(question, query, hits)[1:], tokenizer, budget)
    stop = turn_stop_ids(tokenizer)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, stop_token_ids=stop)
    return AskPrompt(question, query, hits, prompt.ids, params)


def ask(
    index: SearchIndex,
    question: str,
    engine: Engine,
    embedder: Embedder | None = None,
    query: str | None = None,
    k: int = POSTS,
    max_tokens: int = 160,
    temperature: float = 0.0,
) -> Answer:
    """Retrieve the top k posts for the question (or the given query) and let the chat model answer from them."""
    p = ask_prompt(
        index, question, engine.tokenizer, engine.max_len, embedder, query, k, max_tokens, temperature
    )
    result = engine.generate(p.ids, p.params)
    return p.answer(result.text, result.finish_reason)


def search_tool(index: SearchIndex, embedder: Embedder | None, tokenizer: Tokenizer, k: int = POSTS) -> Tool:
    """The chat's search tool (`myna chat --index`): {"query": ...} -> the top k posts, numbered, as many as fit
    the room the conversation leaves (in tokens)."""

    def run(arguments: dict, room: int) -> ToolResult:
        query = arguments.get("query")
        if not isinstance(query, str) or not query.strip():
            return ToolResult(
                'error: expected arguments {"query": "..."}', note="search called without a query"
            )
        try:
            hits = search(index, query, limit=k, embedder=embedder).hits
        except QueryError as e:
            return ToolResult(f"error: {e}", note=f"search {query!r}: {e}")
        while hits and len(tokenizer.encode(format_posts([h.post for h in hits]))) > room:
            hits = hits[:-1]
        content = format_posts([h.post for h in hits]) or "no posts found"
        return ToolResult(content, len(hits), note=f"searched {query!r}: {len(hits)} post(s)")

    return Tool(run, "query")
