"""Ad matching without human labels: hashtag topics of held-out posts as advertisers.

Search's relevance task (myna/search/relevance.py) gives the held-out posts with their evaluated hashtags removed
and, per hashtag, the posts that carried it. Here each hashtag becomes an advertiser whose one ad is about it: the
hashtag's words in a sentence an advertiser might write, and those words as the ad's keywords. For every post
that carried exactly one of the hashtags, each matcher ranks all the ads for the post (its tag removed): is the
first ad the post's own topic (precision@1), and how high is it in the first five (nDCG@5, one relevant ad)?

Matchers compared on the same ads and posts:
- keyword-only: the ads whose keywords the post holds, most matched first (the baseline an ad server without a
  model has);
- Myna: the relevance the ad server ranks candidates by (myna/ads/relevance.py): the model's embeddings of the
  post and the ad, blended with the same keywords.
Ties (every ad, for a post that holds no keyword) are broken in one seeded random order, the same for both: the
inventory lists the most carried hashtag first, and breaking ties by position would credit a matcher with
guessing the commonest topic. Bids, budgets and brand safety are left out: the task measures what an ad is about,
not what it pays.
"""

import json
import math
from pathlib import Path

import numpy as np

from myna.ads.inventory import load_inventory
from myna.ads.relevance import AdRelevance
from myna.io import atomic_write
from myna.search.relevance import held_out, make_tasks

AD_TEXT = "All about {words}: the latest news, offers and updates on {words}, every day."
STOP_WORDS = {"the", "and", "for", "of", "in", "on", "to", "a", "an", "is", "at", "by", "with", "my", "our"}
K = 5  # nDCG@5
SEED = 0


def topic_inventory(tasks: list, path: Path) -> None:
    """One campaign and one ad per hashtag topic, written as an inventory file (and so validated as one)."""
    lines = []
    # ids by position: a hashtag may be in any script, an inventory id is ASCII
    for n, t in enumerate(tasks):
        words = [w for w in t.query.split() if w not in STOP_WORDS and len(w) > 1] or t.query.split()
        # the same bid everywhere and no schedule, language, topic or safety limits: only relevance decides
        lines.append(
            {
                "kind": "campaign",
                "id": f"topic-{n}",
                "advertiser": f"#{t.tag} (made from the hashtag)",
                "bid_type": "cpm",
                "bid": 1.0,
                "daily_budget": 1000,
                "start": "2000-01-01T00:00:00Z",
                "end": "2099-01-01T00:00:00Z",
                "suitability": "relaxed",
            }
        )
        lines.append(
            {
                "kind": "ad",
                "id": f"ad-{n}",
                "campaign": f"topic-{n}",
                "text": AD_TEXT.format(words=t.query)[:280],
                "url": f"https://topic-{n}.example/",
                "keywords": words[:50],
            }
        )
    with atomic_write(path, "w") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))


def rank_of(scores: np.ndarray, gold: int, shuffle: np.ndarray) -> int:
    """The gold ad's rank, 1 first, with ties in `shuffle`'s order."""
    order = shuffle[np.argsort(-scores[shuffle], kind="stable")]
    return int(np.nonzero(order == gold)[0][0]) + 1


def scores_of(ranks: list[int]) -> dict:
    return {
        "precision@1": sum(r == 1 for r in ranks) / len(ranks),
        f"ndcg@{K}": sum(1 / math.log2(r + 1) for r in ranks if r <= K) / len(ranks),
    }


def match_eval(data_dir: str | Path, embedder, out_dir: str | Path) -> dict:
    """Precision@1 and nDCG@5 of keyword-only and Myna matching on the hashtag-topic ads (written to out_dir)."""
    posts, tasks = make_tasks(held_out(Path(data_dir)))
    if len(tasks) < 2:
        raise ValueError(
            f"{data_dir}: fewer than 2 hashtags are carried by enough held-out posts to make ads of"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    topic_inventory(tasks, out / "topic_inventory.jsonl")
    inventory = load_inventory(out / "topic_inventory.jsonl")
    relevance = AdRelevance.build(inventory, embedder)
    # posts about exactly one topic: their topic's ad is the one right answer
    topic_of = {}
    for i, t in enumerate(tasks):
        for pid in t.relevant:
            topic_of[pid] = None if pid in topic_of else i
    cases = [(p, topic_of[p["id"]]) for p in posts if topic_of.get(p["id"]) is not None]
    shuffle = np.random.default_rng(SEED).permutation(len(tasks))
    ranks: dict[str, list[int]] = {"keyword-only": [], "myna": []}
    for post, gold in cases:
        s = relevance.score([post["text"]])
        ranks["keyword-only"].append(rank_of(s.keywords, gold, shuffle))
        ranks["myna"].append(rank_of(s.relevance, gold, shuffle))
    return {
        "topics": len(tasks),
        "posts": len(cases),
        "matchers": {name: scores_of(r) for name, r in ranks.items()},
        "chance_precision@1": 1 / len(tasks),
    }
