"""The search tool as the chat model sees it: the call, the numbered posts it returns, the citations of them in
an answer, and the dialogues that teach a chat model to call it, made from the corpus's own hashtags.

A social network's users ask what people are saying about something; the answer is in the posts. Each hashtag that
enough training posts carry becomes one dialogue in the shape `myna ask` and the chat's tool loop use:

    user: what are people saying about pray for visayas?
    assistant: <|tool_call|>{"name": "search", "arguments": {"query": "#prayforvisayas"}}
    tool: [1] @author (2013-11-10): text  [2] ...          (the posts that carry the tag, newest first)
    assistant: The posts say: "first words of post 1..." [1] "first words of post 2..." [2]

so SFT teaches when to search (a question about what people post), how to write the call, and to answer from the
posts with citations. The answer quotes the posts rather than summarising them: a quote is true to its post, and a
model trained on it learns to ground its words in what the tool returned. Nothing here imports torch.
"""

import re
from datetime import UTC, datetime

from myna.data.pairs import hashtag_carriers
from myna.data.schema import created_seconds
from myna.search.terms import written_tag_words

TOOL = "search"
POSTS = 5  # posts a search hands the model, at most: fewer when they do not fit its context
POST_CHARS = 280  # each post as the model sees it, cut to a post's classic length
TRAIN_POSTS = 2  # posts in a made dialogue, each cut to TRAIN_POST_CHARS: most dialogues fit 256 tokens
TRAIN_POST_CHARS = 100
QUOTED_POSTS = 2  # posts the made answer quotes
QUOTE_WORDS = 8  # words of each
MIN_POSTS = 3  # a hashtag needs this many training posts to be a topic worth asking about
_URL = re.compile(r"https?://\S+|www\.\S+", re.I)
_CITATION = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")
QUESTIONS = (
    "what are people saying about {topic}?",
    "what's the latest on {topic}?",
    "any posts about {topic}?",
    "what do people think about {topic}?",
    "catch me up on {topic}",
)


def format_posts(posts: list[dict], chars: int = POST_CHARS) -> str:
    """The numbered posts as the tool turn shows them: [n] @author (date): text, cut to `chars`. Each post needs
    author (or None), created_at (Unix seconds or None) and text."""
    lines = []
    for n, p in enumerate(posts, start=1):
        when = (
            datetime.fromtimestamp(p["created_at"], UTC).strftime("%Y-%m-%d")
            if p["created_at"]
            else "undated"
        )
        # a link's letters tell the model nothing
        text = " ".join(_URL.sub("(link)", p["text"]).split())[:chars]
        lines.append(f"[{n}] @{p['author'] or 'unknown'} ({when}): {text}")
    return "\n".join(lines)


def check_citations(text: str, n_posts: int) -> tuple[str, list[int], int]:
    """(text without citations of posts that do not exist, the valid numbers in order of first use, removed)."""
    cited: list[int] = []
    removed = 0

    def keep(m: re.Match) -> str:
        nonlocal removed
        valid = []
        for n in (int(x) for x in m.group(1).split(",")):
            if 1 <= n <= n_posts:
                valid.append(n)
                if n not in cited:
                    cited.append(n)
            else:
                removed += 1
        return "[" + ", ".join(map(str, valid)) + "]" if valid else ""

    cleaned = _CITATION.sub(keep, text)
    return re.sub(r"[ \t]{2,}", " ", cleaned).strip(), cited, removed


def search_call(query: str) -> dict:
    return {"name": TOOL, "arguments": {"query": query}}


def quote(text: str) -> str:
    words = text.split()
    return " ".join(words[:QUOTE_WORDS]) + ("..." if len(words) > QUOTE_WORDS else "")


def tool_dialogues(
    corpus: dict[str, list], limit: int, posts_each: int = TRAIN_POSTS, post_chars: int = TRAIN_POST_CHARS
) -> list[dict]:
    """At most `limit` dialogues from the train posts of corpus.parquet's columns (id, author_id, author_name,
    created_at, text, hashtags, split): one per hashtag carried by at least MIN_POSTS of them, the most carried first."""
    by_split, written = hashtag_carriers(corpus, "train")
    carriers = {tag: rows for (_, tag), rows in by_split.items()}
    topics = sorted(
        (t for t, rows in carriers.items() if len(rows) >= MIN_POSTS), key=lambda t: (-len(carriers[t]), t)
    )
    names = corpus.get("author_name") or [None] * len(corpus["id"])  # a corpus prepared before names
    times = [
        created_seconds({"id": i, "created_at": t})
        for i, t in zip(corpus["id"], corpus["created_at"], strict=True)
    ]
    dialogues = []
    for n, tag in enumerate(topics[:limit]):
        posts = [
            {"author": names[i] or corpus["author_id"][i], "created_at": times[i], "text": corpus["text"][i]}
            for i in carriers[tag]
        ]
        posts.sort(key=lambda p: p["created_at"] or 0, reverse=True)  # newest first, as Latest lists them
        posts = posts[:posts_each]
        answer = "The posts say: " + " ".join(
            f'"{quote(p["text"])}" [{k}]' for k, p in enumerate(posts[:QUOTED_POSTS], start=1)
        )
        dialogues.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": QUESTIONS[n % len(QUESTIONS)].format(
                            topic=written_tag_words(written[tag])
                        ),
                    },
                    {"role": "assistant", "content": None, "tool_calls": [search_call(f"#{tag}")]},
                    {"role": "tool", "content": format_posts(posts, post_chars)},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return dialogues
