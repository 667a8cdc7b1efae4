import gzip
import itertools
import json
from pathlib import Path

import orjson
import pytest
import zstandard
from helpers import load_v2_posts

from myna.data.schema import Reject, new_post, posts_to_table
from myna.data.threads import ThreadConfig, build_threads, read_conversations, write_jsonl

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "conversations"
TWCS = SAMPLE / "twcs_airlines.conversations.jsonl.gz"
IBM = [SAMPLE / "ibm_dev.conversations.jsonl.gz", SAMPLE / "ibm_test.conversations.jsonl.gz"]
PHYLLIIDA = SAMPLE / "phylliida_twconv.conversations.jsonl"


def post(id, author, text, parent=None, likes=None, **fields):
    return new_post(
        id, text, f"hand:{id}", author_id=author, in_reply_to_id=parent, like_count=likes, **fields
    )


def hand_built_posts():
    return [
        # Two-author back-and-forth, alice's last reply a self-thread of two posts; greg also answers bob.
        post("a1", "alice", "Anyone tried the new bridge?"),
        post("a2", "bob", "Yes, it sways.", "a1"),
        post("a3", "alice", "Sways how much?", "a2", likes=10),
        post("a4", "alice", "Asking for a friend.", "a3"),
        post("a5", "greg", "Not at all.", "a2", likes=2),
        # A reply whose parent was never collected, answered by dave.
        post("m1", "carol", "Agreed, totally.", "gone"),
        post("m2", "dave", "Agreed with what?", "m1"),
        # A wide tree: erin asks, seven replies; frank wrote two of them; erin's own follow-up is not an answer.
        post("w0", "erin", "Favourite editor?"),
        post("w1", "frank", "vim", "w0", likes=100),
        post("w2", "frank", "neovim", "w0", likes=40),
        post("w3", "gina", "emacs", "w0", likes=12),
        post("w4", "hal", "nano", "w0", likes=3),
        post("w5", "ivy", "ed", "w0", likes=0),
        post("w6", "jo", "notepad", "w0"),  # no like count: cannot be ranked
        post("w7", "erin", "Mine is helix.", "w0", likes=500),
        # Noise: a repost, a duplicated row, an empty post, a reply cycle.
        post("r1", "kim", "RT Anyone tried the new bridge?", repost_of_id="a1"),
        post("a1", "alice", "Anyone tried the new bridge? (second copy)"),
        post("e1", "lee", "   ", "w0"),
        post("c1", "max", "round", "c2"),
        post("c2", "nia", "and round", "c1"),
    ]


def test_hand_built_tree_dialogues_prefs_and_stats():
    res = build_threads(posts_to_table(hand_built_posts()), ThreadConfig())

    def msgs(*pairs):
        return [{"role": role, "content": content} for role, content in pairs]

    by_id = {d["id"]: d for d in res.dialogues}
    assert by_id["thread:a4"]["messages"] == msgs(
        ("assistant", "Anyone tried the new bridge?"),
        ("user", "Yes, it sways."),
        ("assistant", "Sways how much?\n\nAsking for a friend."),
    )
    assert by_id["thread:a4"]["source"] == "hand:a4"
    assert by_id["thread:a5"]["messages"] == msgs(
        ("assistant", "Anyone tried the new bridge?"),
        ("user", "Yes, it sways."),
        ("assistant", "Not at all."),
    )
    assert by_id["thread:m2"]["messages"] == msgs(
        ("user", "Agreed, totally."), ("assistant", "Agreed with what?")
    )
    for leaf, text in [
        ("w1", "vim"),
        ("w2", "neovim"),
        ("w3", "emacs"),
        ("w4", "nano"),
        ("w5", "ed"),
        ("w6", "notepad"),
    ]:
        assert by_id[f"thread:{leaf}"]["messages"] == msgs(("user", "Favourite editor?"), ("assistant", text))
    assert sorted(by_id) == sorted(
        ["thread:a4", "thread:a5", "thread:m2"] + [f"thread:w{k}" for k in range(1, 7)]
    )

    def pref(c, r, chosen, rejected, cl, rl, prompt):
        return {"id": f"pref:{c}>{r}", "prompt": prompt, "chosen": chosen, "rejected": rejected,
                "chosen_likes": cl, "rejected_likes": rl, "source": f"hand:{c}"}  # fmt: skip

    editor = msgs(("user", "Favourite editor?"))
    # Ladder: vim's first beaten reply (neovim) is frank's own, so vim pairs with emacs; nano (3) is below
    # pref_min_likes, so it is never chosen; erin's helix (500) is her own continuation, not an answer.
    assert sorted(res.prefs, key=lambda p: p["id"]) == sorted(
        [
            pref("a3", "a5", "Sways how much?", "Not at all.", 10, 2,
                 msgs(("assistant", "Anyone tried the new bridge?"), ("user", "Yes, it sways."))),
            pref("w1", "w3", "vim", "emacs", 100, 12, editor),
            pref("w2", "w3", "neovim", "emacs", 40, 12, editor),
            pref("w3", "w4", "emacs", "nano", 12, 3, editor),
        ],
        key=lambda p: p["id"],
    )  # fmt: skip
    assert res.stats == {
        "posts": 20,
        "reposts_skipped": 1,
        "empty_text_skipped": 1,
        "duplicate_ids": 1,
        "trees": 3,
        "orphan_roots": 1,
        "unreachable_posts": 2,
        "max_depth": 4,
        "paths": 10,
        "paths_capped": 0,
        "paths_too_short": 1,  # w0 -> w7 is one erin turn
        "paths_truncated": 0,
        "dialogues": 9,
        "multi_author_dialogues": 1,  # alice, bob, greg
        "self_thread_merges": 1,
        "replies_without_likes": 1,
        "pref_parents": 2,
        "pref_parents_capped": 0,
        "prefs": 4,
    }


def test_caps_and_truncation():
    cfg = ThreadConfig(max_turns=2, max_paths_per_tree=4, max_pairs_per_parent=1)
    res = build_threads(posts_to_table(hand_built_posts()), cfg)
    ids = sorted(d["id"] for d in res.dialogues)
    # Wide tree keeps its four most-liked leaves (all depth 2): helix (too short), vim, neovim, emacs.
    assert ids == ["thread:a4", "thread:a5", "thread:m2", "thread:w1", "thread:w2", "thread:w3"]
    assert res.stats["paths_capped"] == 3
    by_id = {d["id"]: d for d in res.dialogues}
    assert by_id["thread:a4"]["messages"] == [
        {"role": "user", "content": "Yes, it sways."},
        {"role": "assistant", "content": "Sways how much?\n\nAsking for a friend."},
    ]
    assert res.stats["paths_truncated"] == 2
    assert sorted(p["id"] for p in res.prefs) == ["pref:a3>a5", "pref:w1>w3"]
    assert res.stats["pref_parents_capped"] == 1
    # The prompt keeps max_turns - 1 turns so the reply still fits.
    prompts = {p["id"]: p["prompt"] for p in res.prefs}
    assert prompts["pref:a3>a5"] == [{"role": "user", "content": "Yes, it sways."}]


def test_config_rejects_margins_that_allow_ties():
    with pytest.raises(ValueError):
        ThreadConfig(pref_margin=1.0)
    with pytest.raises(ValueError):
        ThreadConfig(pref_min_likes=0)
    with pytest.raises(ValueError):
        ThreadConfig(min_turns=5, max_turns=4)


def test_real_v2_reply_trees():
    posts = load_v2_posts()
    cfg = ThreadConfig()
    res = build_threads(posts_to_table(posts), cfg)

    live = {p["id"]: p for p in posts if p["repost_of_id"] is None}
    parents = {p["in_reply_to_id"] for p in live.values()}
    orphans = [
        p for p in live.values() if p["in_reply_to_id"] is not None and p["in_reply_to_id"] not in live
    ]
    roots = [p for p in live.values() if p["in_reply_to_id"] is None or p["in_reply_to_id"] not in live]
    assert res.stats["reposts_skipped"] == len(posts) - len(live) > 0
    assert res.stats["orphan_roots"] == len(orphans) > 0
    assert res.stats["trees"] == len(roots)
    assert res.stats["paths"] == len(set(live) - parents)
    assert res.stats["unreachable_posts"] == 0
    assert res.stats["dialogues"] == len(res.dialogues) > 50

    for d in res.dialogues:
        roles = [m["role"] for m in d["messages"]]
        assert roles[-1] == "assistant" and len(roles) >= 2
        assert all(a != b for a, b in itertools.pairwise(roles))
        assert d["messages"][-1]["content"] == live[d["id"].removeprefix("thread:")]["text"]

    assert len(res.prefs) == res.stats["prefs"] > 10
    for p in res.prefs:
        chosen_id, rejected_id = p["id"].removeprefix("pref:").split(">")
        chosen, rejected = live[chosen_id], live[rejected_id]
        parent = live[chosen["in_reply_to_id"]]
        assert rejected["in_reply_to_id"] == parent["id"]
        assert chosen["author_id"] != rejected["author_id"]
        assert (p["chosen"], p["rejected"]) == (chosen["text"], rejected["text"])
        assert (p["chosen_likes"], p["rejected_likes"]) == (chosen["like_count"], rejected["like_count"])
        assert p["chosen_likes"] >= max(cfg.pref_min_likes, cfg.pref_margin * p["rejected_likes"])
        assert p["prompt"][-1] == {"role": "user", "content": parent["text"]}
    # A reply to @matteosalvinimi liked 3,357 times beats one liked 431 times.
    assert "pref:1574159488931749888>1574159112396496900" in {p["id"] for p in res.prefs}


def runs_after_trim(turns):
    """Independent count: role runs (customer/agent) once trailing customer turns are cut."""
    roles = [t["role"] for t in turns]
    while roles and roles[-1] != "agent":
        roles.pop()
    return [role for role, _ in itertools.groupby(roles)]


@pytest.mark.parametrize("path", [TWCS, *IBM], ids=lambda p: p.name)
def test_customer_care_files(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    out = list(read_conversations(path))
    assert len(out) == len(raw)
    usable = [runs_after_trim(r["turns"]) for r in raw]
    expected = [len(runs) for runs in usable if len(runs) >= 2]
    dialogues = [d for d in out if not isinstance(d, Reject)]
    assert [len(d["messages"]) for d in dialogues] == expected
    assert len(out) - len(dialogues) == sum(len(runs) < 2 for runs in usable)
    for d in dialogues:
        roles = [m["role"] for m in d["messages"]]
        assert roles[-1] == "assistant"
        assert all(a != b for a, b in itertools.pairwise(roles))
    assert dialogues[0]["id"] == f"{path.name}:1" and dialogues[0]["source"] == f"{path}:1"


def test_twcs_keeps_every_word_of_the_kept_turns():
    with gzip.open(TWCS, "rt", encoding="utf-8") as f:
        first = json.loads(f.readline())
    d = next(read_conversations(TWCS))
    assert [m["content"] for m in d["messages"]] == [t["text"] for t in first["turns"]]
    assert [m["role"] for m in d["messages"]] == ["user", "assistant"] * (len(first["turns"]) // 2)


def test_phylliida_alternates_by_position_ending_on_assistant():
    raw = [json.loads(line) for line in PHYLLIIDA.read_text(encoding="utf-8").splitlines()]
    out = list(read_conversations(PHYLLIIDA))
    assert not [r for r in out if isinstance(r, Reject)]
    assert len(out) == len(raw) == 1896
    for rec, d in zip(raw, out, strict=True):
        assert [m["content"] for m in d["messages"]] == [t["text"] for t in rec["turns"]]
        n = len(rec["turns"])
        assert [m["role"] for m in d["messages"]] == [
            "assistant" if (n - 1 - k) % 2 == 0 else "user" for k in range(n)
        ]


def test_bad_lines_become_rejects_with_line_numbers(tmp_path):
    with gzip.open(TWCS, "rt", encoding="utf-8") as f:
        good = [f.readline().rstrip("\n") for _ in range(2)]
    lines = [
        good[0],  # 1
        "{not json",  # 2
        "[1, 2]",  # 3
        '{"first_tweet_id": "9"}',  # 4: no turns
        '{"turns": "hello"}',  # 5
        '{"turns": [{"role": "customer", "text": "hi"}, {"role": "agent", "text": "  "}]}',  # 6: empty text
        '{"turns": [{"role": "customer", "text": "hi"}, {"role": "bot", "text": "yo"}]}',  # 7: unknown role
        '{"turns": [{"role": "customer", "text": "hi"}, {"role": "customer", "text": "anyone?"}]}',  # 8: no agent
        '{"turns": [{"role": "user", "author": null, "text": "alone"}]}',  # 9: one turn
        "",  # 10: blank, not a record
        '{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},'
        ' {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]}',  # 11
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}',  # 12
        good[1],  # 13
    ]
    path = tmp_path / "mixed.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress("\n".join(lines).encode() + b"\n"))
    out = list(read_conversations(path))

    rejects = {r.line: r for r in out if isinstance(r, Reject)}
    assert sorted(rejects) == [2, 3, 4, 5, 6, 7, 8, 9, 12]
    assert "invalid JSON" in rejects[2].reason and rejects[2].snippet == "{not json"
    assert "turns[1].text" in rejects[6].reason
    assert "'bot'" in rejects[7].reason
    assert "fewer than 2 usable turns" in rejects[8].reason and "fewer than 2" in rejects[9].reason
    assert "messages[1].role" in rejects[12].reason
    assert all(r.file == str(path) for r in rejects.values())

    dialogues = [d for d in out if not isinstance(d, Reject)]
    assert [d["id"] for d in dialogues] == ["mixed.jsonl.zst:1", "mixed.jsonl.zst:11", "mixed.jsonl.zst:13"]
    assert dialogues[1]["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]


def test_same_role_turns_merge_and_fmt_hint(tmp_path):
    ibm_double_post = {
        "turns": [
            {"author": "SoulsMindPalace", "role": "customer", "text": "I'm going to puke"},
            {"author": "SoulsMindPalace", "role": "customer", "text": "@YouTube can you please help me?"},
            {"author": "TeamYouTube", "role": "agent", "text": "@SoulsMindPalace If you believe..."},
        ]
    }
    path = tmp_path / "c.jsonl"
    path.write_bytes(orjson.dumps(ibm_double_post) + b"\n")
    (d,) = read_conversations(path)
    assert d["messages"] == [
        {"role": "user", "content": "I'm going to puke\n\n@YouTube can you please help me?"},
        {"role": "assistant", "content": "@SoulsMindPalace If you believe..."},
    ]
    (r,) = read_conversations(path, fmt_hint="messages")
    assert isinstance(r, Reject) and "'messages'" in r.reason
    with pytest.raises(ValueError):
        list(read_conversations(path, fmt_hint="csv"))


def test_write_jsonl_round_trip(tmp_path):
    dialogues = [d for d in itertools.islice(read_conversations(IBM[0]), 5)]
    path = tmp_path / "out" / "dialogues.jsonl"
    assert write_jsonl(path, dialogues) == 5
    assert [orjson.loads(line) for line in path.read_bytes().splitlines()] == dialogues
    assert sorted(p.name for p in path.parent.iterdir()) == ["dialogues.jsonl"]  # no temp file left behind


def test_truncated_conversation_file_keeps_what_was_read(tmp_path):
    whole = gzip.decompress(TWCS.read_bytes()).splitlines(keepends=True)[:300]
    packed = gzip.compress(b"".join(whole))
    path = tmp_path / "cut.conversations.jsonl.gz"
    path.write_bytes(packed[: len(packed) * 2 // 3])
    records = list(read_conversations(path))
    assert not isinstance(records[0], Reject) and len(records) > 50
    assert isinstance(records[-1], Reject) and "truncated" in records[-1].reason
    assert all(not isinstance(r, Reject) for r in records[:-1])
