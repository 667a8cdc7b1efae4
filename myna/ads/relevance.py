"""How relevant each ad is to a context: a named blend of embedding similarity, keyword matches and topic matches.

    relevance = W_EMBEDDING * max(0, cos) + W_KEYWORDS * min(1, matched keywords / KEYWORDS_FOR_FULL)
              + W_TOPICS * [the context mentions one of the campaign's target topics]

The embeddings are search's (myna/search/index.py `Embedder`: the run's model, mean-pooled and normalised), of the
ad's text, keywords and topics, computed once when an inventory is opened and cached on disk under the inventory's
hash and the model's fingerprint. A small model puts every text in a narrow cone (unrelated tweets sit at cosine
~0.9), so the inventory's mean vector is taken off both sides before the cosine, the usual correction for that
anisotropy: what is left is how much closer a context is to one ad than to ads in general.

Words come from search's tokenizer (myna/search/terms.py); a #hashtag also counts as its word and as the words a
person would type for it (#ColdBrew: coldbrew, cold, brew), so a topic or keyword written either way matches.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from myna.ads.inventory import Ad, Campaign, Inventory
from myna.io import atomic_path
from myna.search.index import Embedder
from myna.search.terms import tag_words, terms

W_EMBEDDING = 0.4  # the model's sense of topic: broad, but a small model's is noisy
W_KEYWORDS = 0.4  # the advertiser's own words in the context: the surest sign, as in search ads
W_TOPICS = 0.2  # a target topic in the context; less than keywords, as topics are broad by design
KEYWORDS_FOR_FULL = 2  # two matched keywords are as sure as a text gets; more would reward keyword stuffing
DOCUMENT_FORMAT = 1  # what ad_document embeds; a change makes new cache files, never reads old ones
_HASHTAG = re.compile(r"[#＃]([^\W_]\w*)")


def ad_document(ad: Ad, campaign: Campaign) -> str:
    """The text an ad is embedded as: what it says and what it is about."""
    return "\n".join([ad.text, " ".join(ad.keywords), " ".join(campaign.target_topics)]).strip()


def context_words(texts: list[str] | tuple[str, ...]) -> set[str]:
    """The words of a context that keywords and topics match: search terms, hashtags also as their words."""
    words: set[str] = set()
    for text in texts:
        words.update(_words(text))
        for tag in _HASHTAG.findall(text):
            words.update(tag_words(tag).split())
    return words


def _words(text: str) -> set[str]:
    """Search terms without their '#', and no @mentions (a handle is not a topic)."""
    return {t.removeprefix("#") for t in terms(text) if t[0] != "@"}


def _phrase(text: str) -> tuple[str, ...]:
    """A keyword or topic as the words that must all be in a context for it to match: "#ColdBrew" wants the tag
    (#ColdBrew or #coldbrew), "cold brew" the two words (a #ColdBrew holds them too)."""
    return tuple(sorted(_words(text)))


@dataclass
class _Phrases:
    """Keywords (or topics) of many ads as arrays, so one context matches all of them in a few numpy calls."""

    text: list[str]  # as written, for explanations
    owner: np.ndarray  # [P] the row (ad or campaign) each phrase belongs to
    need: np.ndarray  # [P] how many distinct words the phrase has
    by_word: dict[str, np.ndarray]  # word -> the phrases it is part of

    @classmethod
    def build(cls, lists: list[tuple[str, ...]]) -> "_Phrases":
        text, owner, need, by_word = [], [], [], {}
        for row, phrases in enumerate(lists):
            for phrase in phrases:
                words = _phrase(phrase)
                for w in words:
                    by_word.setdefault(w, []).append(len(text))
                text.append(phrase)
                owner.append(row)
                need.append(len(words))
        arrays = {w: np.array(ids, np.int64) for w, ids in by_word.items()}
        return cls(text, np.array(owner, np.int64), np.array(need, np.int64), arrays)

    def matched(self, words: set[str]) -> np.ndarray:
        """Ids of the phrases whose every word is among `words`."""
        hits = [self.by_word[w] for w in words if w in self.by_word]
        if not hits:
            return np.zeros(0, np.int64)
        counts = np.bincount(np.concatenate(hits), minlength=len(self.need))
        return np.flatnonzero(counts == self.need)


@dataclass
class Scores:
    """Relevance of every ad to one context, and its parts (arrays of length len(inventory.ads))."""

    embedding: np.ndarray  # max(0, centred cosine)
    keywords: np.ndarray  # min(1, matched / KEYWORDS_FOR_FULL)
    topics: np.ndarray  # 1.0 where a target topic of the ad's campaign is in the context
    relevance: np.ndarray
    keyword_ids: np.ndarray  # the keywords found in the context
    topic_ids: np.ndarray  # the topics found
    index: "AdRelevance"

    def matched(self, row: int) -> dict[str, list[str]]:
        """The ad's keywords and its campaign's topics that the context holds, as written."""
        kw, tp = self.index.keywords, self.index.topics
        keywords = self.keyword_ids[kw.owner[self.keyword_ids] == row]
        topics = self.topic_ids[tp.owner[self.topic_ids] == self.index.ad_campaign[row]]
        return {"keywords": [kw.text[k] for k in keywords], "topics": [tp.text[t] for t in topics]}


class AdRelevance:
    """An inventory's ads ready to score: their centred embeddings and their keywords and topics as arrays."""

    def __init__(self, inventory: Inventory, vectors: np.ndarray, embedder: Embedder):
        self.embedder = embedder
        # the ads' mean direction, shared by every text the small model embeds (see the module docstring)
        self.centre = vectors.mean(axis=0)
        self.vectors = _normalise(vectors - self.centre)
        campaign_ids = list(inventory.campaigns)
        campaign_row = {c: i for i, c in enumerate(campaign_ids)}
        self.ad_campaign = np.array([campaign_row[a.campaign] for a in inventory.ads], np.int64)
        self.keywords = _Phrases.build([a.keywords for a in inventory.ads])
        self.topics = _Phrases.build([inventory.campaigns[c].target_topics for c in campaign_ids])
        self.n_campaigns = len(campaign_ids)

    @classmethod
    def build(cls, inventory: Inventory, embedder: Embedder, cache_dir: Path | None = None) -> "AdRelevance":
        return cls(inventory, ad_vectors(inventory, embedder, cache_dir), embedder)

    def context_vector(self, texts: list[str] | tuple[str, ...]) -> np.ndarray:
        """A context's texts embedded, averaged (a user's recent posts, a feed slot's neighbours), centred."""
        mean = self.embedder(list(texts)).mean(axis=0)
        return _normalise(mean / max(np.linalg.norm(mean), 1e-12) - self.centre)

    def score(self, texts: list[str] | tuple[str, ...]) -> Scores:
        cos = self.vectors @ self.context_vector(texts)
        embedding = np.clip(cos, 0.0, 1.0)
        words = context_words(texts)

        keyword_ids = self.keywords.matched(words)
        per_ad = np.bincount(self.keywords.owner[keyword_ids], minlength=len(self.vectors))
        keywords = np.minimum(1.0, per_ad / KEYWORDS_FOR_FULL)

        topic_ids = self.topics.matched(words)
        campaign_hits = np.bincount(self.topics.owner[topic_ids], minlength=self.n_campaigns)
        topics = (campaign_hits[self.ad_campaign] > 0).astype(np.float64)

        relevance = W_EMBEDDING * embedding + W_KEYWORDS * keywords + W_TOPICS * topics
        return Scores(embedding, keywords, topics, relevance, keyword_ids, topic_ids, self)


def ad_vectors(inventory: Inventory, embedder: Embedder, cache_dir: Path | None = None) -> np.ndarray:
    """[ads, dim] float32 embeddings of the ads' documents: read from cache_dir when the same inventory bytes were
    embedded by the same weights before, else embedded now (identical documents once) and written there."""
    cache = None
    if cache_dir is not None:
        key = f"{inventory.sha256[:16]}-{embedder.fingerprint}-v{DOCUMENT_FORMAT}"
        cache = Path(cache_dir) / f"ads-{key}.npy"
        vectors = _read_cache(cache, len(inventory.ads))
        if vectors is not None:
            return vectors
    documents = [ad_document(a, inventory.campaigns[a.campaign]) for a in inventory.ads]
    unique = list(dict.fromkeys(documents))
    row = {d: i for i, d in enumerate(unique)}
    vectors = np.asarray(embedder(unique), np.float32)[[row[d] for d in documents]]
    if cache is not None:
        with atomic_path(cache) as tmp, open(tmp, "wb") as f:
            np.save(f, vectors, allow_pickle=False)
    return vectors


def _read_cache(path: Path, rows: int) -> np.ndarray | None:
    """The cached vectors, or None when absent or not what this inventory needs (then they are made again)."""
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if (
        vectors.dtype != np.float32
        or vectors.ndim != 2
        or len(vectors) != rows
        or not np.isfinite(vectors).all()
    ):
        return None
    return vectors


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)
