"""Reply trees -> chat dialogues and like-based preference pairs; conversation files -> dialogues.

Both entry points produce the same dialogue shape (OpenAI messages):
    {"id": ..., "messages": [{"role": "user" | "assistant", "content": ...}, ...], "source": ...}
and build_threads also produces preference pairs:
    {"id", "prompt": [messages], "chosen", "rejected", "chosen_likes", "rejected_likes", "source"}

Roles policy (posts carry authors, not roles):
- Consecutive posts by the same author are one turn (a self-thread), joined with TURN_SEP. Posts whose author is
  unknown never merge, so they alternate by position.
- The speaker of the final turn is the "assistant"; roles alternate backwards from there, so a dialogue may open
  with an assistant turn (the root post was the assistant's own; we keep it rather than lose the context).
- Paths with more than two authors keep alternating by author change: "assistant" means "the speaker answering
  the previous turn", not one fixed person. Merging every other author into one "user" would glue different
  people's words into one turn; alternation keeps each turn one person's words. Such dialogues are counted.
"""

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pyarrow as pa

from myna.data.readers import ReadOptions, json_records
from myna.data.schema import Reject
from myna.io import atomic_write

TURN_SEP = "\n\n"  # between the posts of one self-thread turn
TURN_ROLES = {"customer": "user", "user": "user", "agent": "assistant", "assistant": "assistant"}
MESSAGE_ROLES = {"system", "user", "assistant", "tool"}
SNIPPET_CHARS = 200


# the posts' columns build_threads reads
COLUMNS = ["id", "author_id", "text", "in_reply_to_id", "repost_of_id", "like_count", "source"]


@dataclass
class ThreadConfig:
    min_turns: int = 2  # merged turns a dialogue needs
    max_turns: int = 16  # longer paths keep their last max_turns turns (the context nearest the reply)
    max_paths_per_tree: int = (
        64  # wide trees: keep the deepest leaves (then most liked) so a prefix is not repeated
    )
    # A pair needs chosen_likes >= pref_min_likes AND chosen_likes >= pref_margin * rejected_likes.
    # With pref_min_likes >= 1 and pref_margin > 1 the chosen reply always has strictly more likes.
    pref_min_likes: int = 5
    pref_margin: float = 2.0
    max_pairs_per_parent: int = 8  # a viral post's replies should not flood the pairs with one prompt

    def __post_init__(self) -> None:
        if not 1 <= self.min_turns <= self.max_turns:
            raise ValueError(f"need 1 <= min_turns <= max_turns, got {self.min_turns}, {self.max_turns}")
        if self.max_paths_per_tree < 1 or self.max_pairs_per_parent < 1:
            raise ValueError("max_paths_per_tree and max_pairs_per_parent must be >= 1")
        if self.pref_min_likes < 1 or self.pref_margin <= 1:
            raise ValueError(
                f"need pref_min_likes >= 1 and pref_margin > 1, got {self.pref_min_likes}, {self.pref_margin}"
            )


@dataclass
class ThreadResult:
    dialogues: list[dict] = field(default_factory=list)
    prefs: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


STAT_KEYS = (
    "posts",  # rows in the input table
    "reposts_skipped",  # repost_of_id set: not part of any conversation
    "empty_text_skipped",  # nothing to say; their replies start their own trees
    "duplicate_ids",  # later rows with an id already seen
    "trees",
    "orphan_roots",  # replies whose parent is not in the data: each starts its own tree
    "unreachable_posts",  # reply cycles (malformed data): no root leads to them
    "max_depth",  # most posts on one root-to-leaf path
    "paths",  # root-to-leaf paths (leaves)
    "paths_capped",  # leaves beyond max_paths_per_tree
    "paths_too_short",  # fewer than min_turns turns after merging self-threads
    "paths_truncated",  # more than max_turns turns: the earliest were cut
    "dialogues",
    "multi_author_dialogues",
    "self_thread_merges",  # posts merged into the previous post's turn, over emitted dialogues
    "replies_without_likes",  # siblings with no like_count cannot be ranked
    "pref_parents",  # parents that yielded at least one pair
    "pref_parents_capped",
    "prefs",
)


def build_threads(posts: pa.Table, cfg: ThreadConfig) -> ThreadResult:
    """Rebuild reply trees from in_reply_to_id; emit one dialogue per kept leaf and like-ranked sibling pairs."""
    stats = Counter({key: 0 for key in STAT_KEYS})
    stats["posts"] = posts.num_rows
    col = {name: posts.column(name).to_pylist() for name in COLUMNS}
    row_of = _usable_rows(col, stats)
    parent, children, roots = _reply_trees(row_of, col, stats)

    def path_to(row: int) -> list[int]:
        path = [row]
        while path[-1] in parent:
            path.append(parent[path[-1]])
        return path[::-1]

    dialogues, prefs, reached = [], [], 0
    for root in roots:
        stats["trees"] += 1
        # Iterative walk: real threads can be thousands of posts deep.
        depth_of, leaves, stack = {root: 1}, [], [root]
        while stack:
            node = stack.pop()
            reached += 1
            kids = children.get(node, [])
            if not kids:
                leaves.append(node)
            for kid in kids:
                depth_of[kid] = depth_of[node] + 1
                stack.append(kid)
            if len(kids) >= 2:
                prefs.extend(_pairs_for_parent(node, kids, path_to, col, cfg, stats))
        stats["max_depth"] = max(stats["max_depth"], max(depth_of.values()))
        stats["paths"] += len(leaves)
        if len(leaves) > cfg.max_paths_per_tree:
            leaves.sort(key=lambda r: (-depth_of[r], -(col["like_count"][r] or 0), r))
            stats["paths_capped"] += len(leaves) - cfg.max_paths_per_tree
            leaves = leaves[: cfg.max_paths_per_tree]
        for leaf in sorted(leaves):
            if (dialogue := _path_dialogue(path_to(leaf), col, cfg, stats)) is not None:
                dialogues.append(dialogue)
    stats["unreachable_posts"] = len(row_of) - reached
    stats["dialogues"] = len(dialogues)
    stats["prefs"] = len(prefs)
    return ThreadResult(dialogues=dialogues, prefs=prefs, stats=dict(stats))


def _usable_rows(col: dict[str, list], stats: Counter) -> dict[str, int]:
    """Post id -> row, for the posts a thread can hold: reposts, empty texts and repeated ids left out (counted)."""
    row_of: dict[str, int] = {}
    for i, post_id in enumerate(col["id"]):
        if col["repost_of_id"][i] is not None:
            stats["reposts_skipped"] += 1
        elif not col["text"][i].strip():
            stats["empty_text_skipped"] += 1
        elif post_id in row_of:
            stats["duplicate_ids"] += 1
        else:
            row_of[post_id] = i
    return row_of


def _reply_trees(row_of: dict[str, int], col: dict[str, list], stats: Counter):
    """(parent row of each reply, children rows of each post, root rows); a reply whose parent is missing is a
    root (an orphan, counted)."""
    parent: dict[int, int] = {}
    children: dict[int, list[int]] = defaultdict(list)
    roots = []
    for i in row_of.values():
        ref = col["in_reply_to_id"][i]
        p = row_of.get(ref) if ref is not None else None
        if p is None:
            roots.append(i)
            if ref is not None:
                stats["orphan_roots"] += 1
        else:
            parent[i] = p
            children[p].append(i)
    return parent, children, roots


def _path_dialogue(path: list[int], col: dict[str, list], cfg: ThreadConfig, stats: Counter) -> dict | None:
    """The dialogue of one root-to-leaf path (one author's consecutive posts merged into a turn), or None when it
    has too few turns."""
    authors = [col["author_id"][r] for r in path]
    turns = _merge_by_author(authors, [col["text"][r] for r in path])
    if len(turns) < cfg.min_turns:
        stats["paths_too_short"] += 1
        return None
    if len(turns) > cfg.max_turns:
        stats["paths_truncated"] += 1
        turns = turns[-cfg.max_turns :]
    stats["self_thread_merges"] += len(path) - len(turns)
    stats["multi_author_dialogues"] += len(set(authors) - {None}) > 2
    leaf = path[-1]
    messages = _alternate(turns, last="assistant")
    return {"id": f"thread:{col['id'][leaf]}", "messages": messages, "source": col["source"][leaf]}


def _pairs_for_parent(
    parent_row: int,
    kids: list[int],
    path_to: Callable[[int], list[int]],
    col: dict[str, list],
    cfg: ThreadConfig,
    stats: Counter,
) -> list[dict]:
    """Like-ranked pairs among the replies to one post, as a ladder, not all O(n^2) pairs.

    Replies by the parent's own author are continuations (a self-thread), not answers, so they are left out.
    Ranked by likes, each reply (as chosen) is paired with the highest-ranked reply below it that it beats by the
    margin and that another author wrote. So each reply is chosen at most once (pairing the top reply with all
    others would teach one text n-1 times), and a parent with n replies gives at most n-1 pairs, at most
    max_pairs_per_parent of them, most-liked first. Likes are a snapshot: early replies had longer to collect them.
    """
    authors, likes = col["author_id"], col["like_count"]
    parent_author = authors[parent_row]
    ranked = []
    for kid in kids:
        if parent_author is not None and authors[kid] == parent_author:
            continue
        if likes[kid] is None:
            stats["replies_without_likes"] += 1
            continue
        ranked.append(kid)
    ranked.sort(key=lambda r: (-likes[r], r))

    pairs, j = [], 0
    for i, chosen in enumerate(ranked):
        if likes[chosen] < cfg.pref_min_likes:
            break  # sorted: no later reply can be chosen either
        # The first beaten rank only moves down as the chosen likes fall, so j never goes back.
        j = max(j, i + 1)
        while j < len(ranked) and likes[chosen] < cfg.pref_margin * likes[ranked[j]]:
            j += 1
        others = (ranked[k] for k in range(j, len(ranked)))
        rejected = next((r for r in others if authors[r] is None or authors[r] != authors[chosen]), None)
        if rejected is None:
            continue
        if len(pairs) == cfg.max_pairs_per_parent:
            stats["pref_parents_capped"] += 1
            break
        pairs.append((chosen, rejected))
    if not pairs:
        return []
    stats["pref_parents"] += 1

    path = path_to(parent_row)
    turns = _merge_by_author([authors[r] for r in path], [col["text"][r] for r in path])
    prompt = _alternate(turns[-max(1, cfg.max_turns - 1) :], last="user")  # room for the reply
    ids, texts = col["id"], col["text"]
    return [
        {
            "id": f"pref:{ids[c]}>{ids[r]}",
            "prompt": prompt,
            "chosen": texts[c],
            "rejected": texts[r],
            "chosen_likes": likes[c],
            "rejected_likes": likes[r],
            "source": col["source"][c],
        }
        for c, r in pairs
    ]


def _merge_by_author(authors: list[str | None], texts: list[str]) -> list[str]:
    """One turn per run of posts by the same known author."""
    turns: list[str] = []
    for k, (author, text) in enumerate(zip(authors, texts, strict=True)):
        if k and author is not None and author == authors[k - 1]:
            turns[-1] += TURN_SEP + text
        else:
            turns.append(text)
    return turns


def _alternate(turns: list[str], last: str) -> list[dict]:
    """Messages whose roles alternate backwards from `last` on the final turn."""
    other = "user" if last == "assistant" else "assistant"
    n = len(turns)
    return [{"role": last if (n - 1 - k) % 2 == 0 else other, "content": t} for k, t in enumerate(turns)]


def read_conversations(path: str | Path, fmt_hint: str | None = None) -> Iterator[dict | Reject]:
    """Conversation JSON Lines or one JSON array of them (gzip/zstd transparent) -> dialogue dicts, or a Reject
    per unusable record (numbered by line, or by position in the array).

    Shapes, detected per record unless fmt_hint ("turns" or "messages") forces one:
    - {"turns": [{"role": customer|agent|user|assistant, "text", "author"?}]} (twcs, IBM, phylliida):
      customer->user, agent->assistant, consecutive same-role turns merged (an IBM customer double-post or a
      second customer joining), trailing user turns dropped so the dialogue ends on the assistant.
      When every role is "user" (phylliida: no assistant side recorded), speakers are told apart by author
      change, or by position when authors are absent, and the last one is the assistant.
    - {"messages": [{"role": system|user|assistant|tool, "content"}]} (OpenAI): kept as given, trailing
      non-assistant messages dropped.
    A conversation needs at least 2 usable turns (system messages do not count).
    """
    if fmt_hint not in (None, "turns", "messages"):
        raise ValueError(f"fmt_hint must be None, 'turns' or 'messages', got {fmt_hint!r}")
    name = Path(path).name
    # the readers' JSON records: JSON lines or one JSON array, bounded record size, and a truncated gzip/zstd
    # stream becomes a Reject
    for item in json_records(str(path), ReadOptions()):
        if isinstance(item, Reject):
            yield item
            continue
        record, line_no, raw = item
        messages = _messages_from_record(record, fmt_hint)
        if isinstance(messages, str):
            snippet = raw.decode("utf-8", "replace").strip()[:SNIPPET_CHARS]
            yield Reject(str(path), line_no, messages, snippet)
        else:
            yield {"id": f"{name}:{line_no}", "messages": messages, "source": f"{path}:{line_no}"}


def _messages_from_record(rec: object, fmt_hint: str | None) -> list[dict] | str:
    """The record's messages, or the reason it cannot be used."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    shape = fmt_hint or ("messages" if "messages" in rec else "turns" if "turns" in rec else None)
    if shape is None:
        return "no 'turns' or 'messages' field"
    items = rec.get(shape)
    if not isinstance(items, list) or not items:
        return f"'{shape}' must be a non-empty list, got {type(items).__name__}"
    messages = _from_messages(items) if shape == "messages" else _from_turns(items)
    if isinstance(messages, str):
        return messages
    usable = sum(m["role"] != "system" for m in messages)
    if usable < 2:
        return f"fewer than 2 usable turns ({usable} after merging and dropping trailing non-assistant turns)"
    return messages


def _from_turns(turns: list) -> list[dict] | str:
    roles, texts, authors = [], [], []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f"turns[{k}] must be an object"
        role, text, author = turn.get("role"), turn.get("text"), turn.get("author")
        if role not in TURN_ROLES:
            return f"turns[{k}].role must be one of {sorted(TURN_ROLES)}, got {role!r}"
        if not isinstance(text, str) or not text.strip():
            return f"turns[{k}].text must be a non-empty string"
        if author is not None and not isinstance(author, str):
            return f"turns[{k}].author must be a string or null"
        roles.append(role)
        texts.append(text)
        authors.append(author)

    if all(role == "user" for role in roles):
        return _alternate(_merge_by_author(authors, texts), last="assistant")
    messages: list[dict] = []
    for role, text in zip(roles, texts, strict=True):
        role = TURN_ROLES[role]
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += TURN_SEP + text
        else:
            messages.append({"role": role, "content": text})
    return _drop_trailing_non_assistant(messages)


def _from_messages(items: list) -> list[dict] | str:
    messages = []
    for k, msg in enumerate(items):
        if not isinstance(msg, dict):
            return f"messages[{k}] must be an object"
        role, content = msg.get("role"), msg.get("content")
        if role not in MESSAGE_ROLES:
            return f"messages[{k}].role must be one of {sorted(MESSAGE_ROLES)}, got {role!r}"
        if not isinstance(content, str) or not content.strip():
            return f"messages[{k}].content must be a non-empty string"
        messages.append({"role": role, "content": content})
    return _drop_trailing_non_assistant(messages)


def _drop_trailing_non_assistant(messages: list[dict]) -> list[dict]:
    """A dialogue teaches the assistant's reply, so it ends on one."""
    end = len(messages)
    while end and messages[end - 1]["role"] != "assistant":
        end -= 1
    return messages[:end]


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Write records as JSON Lines atomically; returns how many were written."""
    n = 0
    with atomic_write(path, "wb") as f:
        for rec in records:
            f.write(orjson.dumps(rec))
            f.write(b"\n")
            n += 1
    return n
