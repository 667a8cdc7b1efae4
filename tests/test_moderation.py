"""Moderation policy: whole-word matching on real tweets, operator files and their errors, verdict precedence,
reports for requests and replies, and the stream guard on deltas split anywhere."""

import gzip
import itertools
import json
import random
import re
import time
from pathlib import Path

import pytest

from myna.moderation import (
    ACTIONS,
    Category,
    Policy,
    StreamGuard,
    Verdict,
    moderate_exchange,
    normalize,
)

POSTS = Path(__file__).resolve().parents[1] / "data" / "sample" / "posts"


def tweets(name: str, n: int) -> list[str]:
    with gzip.open(POSTS / f"sentiment140_{name}.txt.gz", "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in itertools.islice(f, n)]


NEGATIVE = tweets("negative", 3000)
POSITIVE = tweets("positive", 2000)


def policy(**categories: Category) -> Policy:
    return Policy(dict(categories), source="test")


def write(tmp_path: Path, data, name: str = "policy.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


# -- the default policy on real text --------------------------------------------------------------------------------


def test_default_policy_labels_some_real_tweets_and_passes_most():
    p = Policy.default()
    assert set(p.categories) == {"hate", "harassment", "sexual", "violence", "self_harm", "profanity", "scam"}
    assert all(c.action == "label" for c in p.categories.values())
    verdicts = [p.check(t) for t in NEGATIVE + POSITIVE]
    flagged = [v for v in verdicts if v.categories]
    assert 0.01 < len(flagged) / len(verdicts) < 0.10  # measured: 3.3% of these 5,000
    assert all(v.action == "label" and not v.blocked for v in flagged)
    profane = [t for t, v in zip(NEGATIVE, verdicts, strict=False) if "profanity" in v.names()]
    assert any("fuck" in t.lower() for t in profane) and any("shit" in t.lower() for t in profane)


def test_real_tweets_with_ass_inside_words_are_not_labelled_for_it():
    # An independent check: "ass" is reported only where the tweet has it as a word of its own.
    p = Policy.default()
    inside = [t for t in NEGATIVE + POSITIVE if re.search(r"\wass|ass\w", t.lower())]
    assert len(inside) > 100  # class, pass, glass, assignment, ...
    for t in inside:
        if "ass" in itertools.chain.from_iterable(h.matches for h in p.check(t).categories):
            assert re.search(r"(?<![\w@])a(ss|\$\$)+(?!\w)", normalize(t)), t


def test_profanity_in_negative_tweets_and_follower_spam_in_positive_ones():
    p = Policy.default()
    neg = [p.check(t).names() for t in NEGATIVE]
    pos = [p.check(t).names() for t in POSITIVE]
    rate = lambda names, cat: sum(cat in n for n in names) / len(names)  # noqa: E731
    assert rate(neg, "profanity") > 1.5 * rate(pos, "profanity") > 0  # measured 2.5% and 1.4%
    # The positive sample opens with a burst of "Get 100 followers a day using www...." spam.
    spam = [t for t, n in zip(POSITIVE, pos, strict=True) if "scam" in n]
    assert len(spam) > 50 and all("followers a day" in t.lower() for t in spam)
    assert rate(neg, "scam") == 0


def test_off_allows_everything():
    p = Policy.off()
    assert p.categories == {}
    assert all(p.check(t) == Verdict() for t in NEGATIVE[:500])
    assert p.check("fuck this shit").to_dict() == {"action": "allow", "categories": []}


# -- how terms match -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "the class assistant passed the bass",
        "assess the grass in Massachusetts",
        "Scunthorpe United",
        "shitake mushrooms",
        "my exam scores were 455 and 5h",  # digits alone stay numbers: "455" is not "ass"
        "@asshole_fan said hi",  # @mentions are names, never matched
        "see http://example.com/ass/shit and www.shit.example",  # nor URLs
        "he was an assassin",
    ],
)
def test_whole_words_only(text: str):
    assert Policy.default().check(text) == Verdict()


@pytest.mark.parametrize(
    "text, term",
    [
        ("What an ASS.", "ass"),
        ("kick-ass", "ass"),
        ("𝐬𝐡𝐢𝐭 happens", "shit"),  # mathematical bold letters, NFKC
        ("ｓｈｉｔ", "shit"),  # fullwidth
        ("sh\u200bit", "shit"),  # a zero-width space inside the word
        ("sh1t", "shit"),  # leetspeak digits
        ("$hit", "shit"),
        ("a$$", "ass"),
        ("b1tch", "bitch"),
        ("shiiiiit", "shit"),  # elongated
        ("fuuuuuck", "fuck"),
        ("Shit!!!", "shit"),
    ],
)
def test_normalisation_leetspeak_and_elongation(text: str, term: str):
    v = Policy.default().check(text)
    assert v.action == "label" and v.categories[0].matches == [term], v


def test_doubled_letter_is_not_elongation():
    p = policy(test=Category("label", ["god", "hate"]))
    assert p.check("good food") == Verdict()  # English doubles letters: "good" is not "god"
    assert p.check("haate") == Verdict()
    assert p.check("I haaate it").categories[0].matches == ["hate"]
    assert p.check("goood").categories[0].matches == ["god"]  # three or more is elongation, whatever it hides


def test_phrases_span_punctuation_but_not_urls_or_mentions():
    p = policy(h=Category("label", ["kill yourself"]))
    assert p.check("just KILL... yourself").action == "label"
    assert p.check("kill-yourself").action == "label"
    assert p.check("kill http://t.co/x yourself") == Verdict()
    assert p.check("kill @yourself") == Verdict()
    assert p.check("kill yourselves") == Verdict()
    assert p.check("don't kill") == Verdict()


def test_patterns_for_what_words_cannot_express():
    p = policy(spam=Category("label", patterns=[r"\d+ followers a day", "傻逼"]))
    assert p.check("Get 100 Followers A Day now").categories[0].matches == [r"\d+ followers a day"]
    assert p.check("你这个傻逼").categories[0].matches == ["傻逼"]  # no spaces between Chinese words
    assert p.check("followers a day") == Verdict()


def test_many_terms_stay_fast():
    rng = random.Random(0)
    letters = "bcdfghjklmnpqrstvwxz"
    terms = [
        "".join(rng.choices(letters, k=8)) + " " + "".join(rng.choices(letters, k=6)) for _ in range(20_000)
    ]
    big = policy(big=Category("label", terms))
    assert big.check(f"so {terms[123].upper()} ok").categories[0].matches == [terms[123]]
    sample = NEGATIVE[:2000]
    start = time.perf_counter()
    for t in sample:
        big.check(t)
    per_s = len(sample) / (time.perf_counter() - start)
    assert per_s > 2000, f"{per_s:.0f} checks/s with 20,000 terms"  # measured ~25,000/s


def test_default_policy_is_fast_on_tweets():
    p = Policy.default()
    start = time.perf_counter()
    for t in NEGATIVE:
        p.check(t)
    per_s = len(NEGATIVE) / (time.perf_counter() - start)
    assert per_s > 2000, f"{per_s:.0f} checks/s"  # measured ~23,000/s on one core


# -- verdicts -------------------------------------------------------------------------------------------------------


def test_block_beats_label_beats_allow():
    p = policy(
        mild=Category("label", ["darn"]),
        bad=Category("block", ["heck"]),
        fine=Category("allow", ["gosh"]),
    )
    assert p.check("gosh").to_dict() == {"action": "allow", "categories": []}  # allow: not even checked
    assert p.check("darn, gosh").action == "label"
    v = p.check("heck and darn and gosh, darn")
    assert v.action == "block" and v.blocked
    assert v.to_dict() == {
        "action": "block",
        "categories": [  # the policy's order, each term once
            {"category": "mild", "action": "label", "matches": ["darn"]},
            {"category": "bad", "action": "block", "matches": ["heck"]},
        ],
    }
    assert v.names("block") == ["bad"]
    assert ACTIONS == ("allow", "label", "block")


def test_verdict_dict_is_json():
    v = Policy.default().check("wtf, this is bullshit. kill yourself")
    d = json.loads(json.dumps(v.to_dict()))
    assert d == v.to_dict()
    assert d["action"] == "label"
    assert [(c["category"], c["matches"]) for c in d["categories"]] == [
        ("harassment", ["kill yourself"]),
        ("profanity", ["wtf", "bullshit"]),
    ]


# -- operator files -------------------------------------------------------------------------------------------------


def test_operator_json_extends_the_default(tmp_path: Path):
    path = write(
        tmp_path,
        {
            "about": "our server",
            "categories": {
                "hate": {"action": "block"},
                "profanity": {"action": "allow"},
                "sexual": {"terms": ["lewd pic"]},
                "brand": {"action": "label", "terms": ["rival inc"], "patterns": [r"rival\.com"]},
            },
            "refusal": "No. ({categories})",
        },
    )
    p = Policy.load(path)
    assert p.source == str(path)
    assert p.categories["hate"].action == "block"
    assert "faggot" in p.categories["hate"].terms  # the default terms stay
    assert p.categories["sexual"].terms[-1] == "lewd pic" and "porn" in p.categories["sexual"].terms
    assert p.check("fuck").action == "allow"
    assert p.check("a lewd pic").names() == ["sexual"]
    assert p.check("Rival Inc and rival.com").categories[0].matches == ["rival inc", r"rival\.com"]
    r = moderate_exchange(p, "you f4ggot")
    assert r.blocked == "input" and r.message == "No. (hate)"


def test_operator_toml_from_none(tmp_path: Path):
    path = write(
        tmp_path,
        'extends = "none"\nwithheld = "Withheld."\n[categories.brand]\naction = "block"\nterms = ["rival inc"]\n',
        "policy.toml",
    )
    p = Policy.load(path)
    assert list(p.categories) == ["brand"]
    assert p.check("shit") == Verdict()
    assert moderate_exchange(p, "hi", "buy from Rival Inc").message == "Withheld."


def test_policy_round_trips_through_its_dict(tmp_path: Path):
    p = Policy.default()
    q = Policy.load(write(tmp_path, p.to_dict()))
    assert q.categories == p.categories and q.refusal == p.refusal and q.withheld == p.withheld


@pytest.mark.parametrize(
    "data, field, said",
    [
        ({"categories": {"hat": {"action": "block"}}}, "categories.hat", "unknown category"),
        ({"categories": {"hate": {"action": "deny"}}}, "categories.hate.action", "allow, label, block"),
        (
            {"categories": {"x": {"patterns": ["(unclosed"]}}},
            "categories.x.patterns[0]",
            "bad regular expression",
        ),
        ({"categories": {"x": {"terms": ["ok", "!!!"]}}}, "categories.x.terms[1]", "no words"),
        ({"categories": {"x": {"terms": ["@someone"]}}}, "categories.x.terms[0]", "no words"),
        ({"categories": {"x": {"terms": [3]}}}, "categories.x.terms[0]", "expected a string"),
        ({"categories": {"x": {"terms": "abc"}}}, "categories.x.terms", "expected a list"),
        ({"categories": {"x": {"action": "label", "words": ["a"]}}}, "categories.x", "unknown field 'words'"),
        ({"categories": {"Bad Name": {"terms": ["a"]}}}, "categories.Bad Name", "lower-case"),
        ({"categories": {"hate": "block"}}, "categories.hate", "expected an object"),
        ({"categories": []}, "categories", "expected an object"),
        ({"catgories": {}}, "unknown field 'catgories'", "expected about, extends"),
        ({"extends": "strict"}, "extends", "'default' or 'none'"),
        ({"refusal": "No {reason}"}, "refusal", "{categories}"),
        ({"withheld": 5}, "withheld", "expected a string"),
        ([], "", "expected an object at the top"),
    ],
)
def test_operator_file_errors_name_the_file_and_field(tmp_path: Path, data, field: str, said: str):
    path = write(tmp_path, data)
    with pytest.raises(ValueError) as e:
        Policy.load(path)
    assert str(e.value).startswith(f"{path}: {field}"), str(e.value)
    assert said in str(e.value)


def test_term_error_is_numbered_as_in_the_operators_file(tmp_path: Path):
    # "sexual" already has default terms; the operator's first term is still terms[0].
    path = write(tmp_path, {"categories": {"sexual": {"terms": ["..."]}}})
    with pytest.raises(ValueError, match=r"categories\.sexual\.terms\[0\]"):
        Policy.load(path)


def test_unreadable_files(tmp_path: Path):
    with pytest.raises(ValueError, match=r"policy\.json: not valid JSON"):
        Policy.load(write(tmp_path, '{"categories": {'))
    with pytest.raises(ValueError, match=r"policy\.toml: not valid TOML"):
        Policy.load(write(tmp_path, "categories = [", "policy.toml"))
    with pytest.raises(FileNotFoundError):
        Policy.load(tmp_path / "missing.json")


def test_policies_built_in_code_are_checked_too():
    with pytest.raises(ValueError, match=r"test: categories\.x\.action"):
        policy(x=Category("warn", ["a"]))


# -- one exchange ---------------------------------------------------------------------------------------------------


def exchange_policy() -> Policy:
    return policy(rude=Category("label", ["jerk"]), threat=Category("block", ["i will hurt you"]))


def test_blocked_request_is_refused_before_generation_and_says_why():
    p = exchange_policy()
    r = moderate_exchange(p, "I WILL hurt you, jerk")
    assert r.blocked == "input" and r.action == "block" and r.output is None
    assert "(threat)" in r.message
    d = r.to_dict()
    assert d["blocked"] == "input" and d["output"] is None and d["message"] == r.message
    assert d["input"]["categories"][1] == {
        "category": "threat",
        "action": "block",
        "matches": ["i will hurt you"],
    }


def test_blocked_reply_is_withheld_and_labels_pass_through():
    p = exchange_policy()
    before = moderate_exchange(p, "you jerk")  # checked before generating: labelled, not blocked
    assert before.blocked is None and before.action == "label" and before.output is None
    r = moderate_exchange(p, "you jerk", "fine, i will hurt you")
    assert r.blocked == "output" and r.message.startswith("This reply was withheld") and "threat" in r.message
    assert r.input.action == "label" and r.output.names() == ["threat"]
    ok = moderate_exchange(p, "hello", "hi, jerk")
    assert (ok.action, ok.blocked, ok.message, ok.input.action, ok.output.action) == (
        "label",
        None,
        None,
        "allow",
        "label",
    )
    assert json.loads(json.dumps(ok.to_dict()))["output"]["categories"][0]["matches"] == ["jerk"]
    clean = moderate_exchange(p, "hello", "hi")
    assert clean.to_dict() == {
        "action": "allow",
        "blocked": None,
        "message": None,
        "input": {"action": "allow", "categories": []},
        "output": {"action": "allow", "categories": []},
    }


# -- streaming ------------------------------------------------------------------------------------------------------


def stream(guard: StreamGuard, deltas: list[str]) -> str:
    out = ""
    for d in deltas:
        out += guard.feed(d)
        if guard.blocked:
            return out
    return out + guard.finish()


def splits(text: str, rng: random.Random) -> list[str]:
    cuts = (
        sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        if len(text) > 1
        else []
    )
    return [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]


def test_stream_holds_back_until_a_word_is_complete():
    p = policy(threat=Category("block", ["kill"]))
    g = StreamGuard(p)
    assert g.feed("the ki") == "the "
    assert g.feed("ll") == ""  # "kill" might still become "killer"
    assert g.feed("er whale ") == "killer "
    assert g.feed("will kill") == "whale will "
    assert not g.blocked
    assert g.feed(" them") == ""
    assert g.blocked.names() == ["threat"]
    assert g.feed(" all") == "" and g.finish() == ""  # nothing after a block
    assert g.text == "the killer whale will kill them all"


def test_stream_phrase_split_mid_word_at_every_point():
    p = policy(threat=Category("block", ["i will hurt you"]), rude=Category("label", ["jerk"]))
    assert p.block_words == 4
    text = "ok jerk, listen: I will hu\u200brt you tomorrow."
    for i, j in itertools.combinations(range(1, len(text)), 2):
        g = StreamGuard(p)
        sent = stream(g, [text[:i], text[i:j], text[j:]])
        assert g.blocked is not None and g.blocked.names("block") == ["threat"]
        assert "will" not in sent and text.startswith(sent)


def test_stream_without_block_categories_releases_at_once():
    g = StreamGuard(policy(rude=Category("label", ["jerk"])))
    assert g.feed("you je") == "you je"
    assert g.feed("rk") == "rk" and g.finish() == "" and g.blocked is None


def test_stream_matches_the_whole_text_check_on_real_tweets():
    # Profanity blocked: for every tweet, streamed in random pieces, the guard blocks exactly when a check of the
    # whole text does, never lets a block term out, and otherwise delivers the text unchanged.
    p = Policy.from_dict({"categories": {"profanity": {"action": "block"}}}, source="test")
    rng = random.Random(4)
    texts = NEGATIVE[:800]
    blocked = 0
    for text in texts:
        g = StreamGuard(p)
        sent = stream(g, splits(text, rng))
        if p.check(text).blocked:
            blocked += 1
            assert g.blocked is not None, text
            assert text.startswith(sent) and not p.check(sent).blocked, (text, sent)
            assert moderate_exchange(p, "", g.text).blocked == "output"
        else:
            assert g.blocked is None and sent == text, text
    assert blocked > 20
