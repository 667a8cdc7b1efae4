"""Ad copy from the chat model: every constraint checked on real samples of the tiny SFT model, rejections counted."""

import re
from pathlib import Path

import pytest

from myna.ads.copy import MAX_CHARS, Brief, names_brand, write_copy
from myna.ads.safety import BrandSafety
from myna.infer.engine import Engine
from myna.runs import load_model


@pytest.fixture(scope="module")
def engine(sft_run: Path):
    loaded = load_model(sft_run)
    with Engine(loaded.model, loaded.tokenizer, max_batch=4) as e:
        yield e


def test_variants_meet_every_constraint(engine):
    brief = Brief("cheap flights to the coast this weekend", "Skylark Air")
    written = write_copy(engine, brief, n=3, safety=BrandSafety.load())
    assert written.accepted, written.rejected
    for text in written.accepted:
        assert len(text) <= MAX_CHARS and names_brand(text, "Skylark Air")
    # every sample is either kept or counted under its reason
    assert len(written.variants) == len(written.accepted) + sum(written.rejected.values())
    assert {v.text for v in written.variants if v.accepted} == set(written.accepted)


def test_banned_words_and_unsafe_copy_are_rejected_with_their_reason(engine):
    brief = Brief("cheap flights to the coast this weekend", "Skylark Air")
    first = write_copy(engine, brief, n=2)
    # ban a word the model wrote: the same samples (same seeds) are now rejected for it
    words = (w.strip(".,!?:;\"'()") for t in first.accepted for w in t.removeprefix(brief.brand).split())
    written = [w for w in words if re.fullmatch(r"[a-z]{3,}", w)]
    assert written, first.variants
    word = written[0]
    again = write_copy(engine, Brief(brief.text, brief.brand, banned=(word,)), n=2)
    assert again.rejected["banned word"] >= 1
    assert all(word.casefold() not in t.casefold().split() for t in again.accepted)
    # a brand whose own name is a sensitive term: its copy is never low risk, so none passes
    unsafe = write_copy(engine, Brief("fast delivery", "Heroin Hut"), n=2, safety=BrandSafety.load())
    assert unsafe.accepted == [] and unsafe.rejected["brand safety"] == len(unsafe.variants) - sum(
        count for reason, count in unsafe.rejected.items() if reason != "brand safety"
    )
    assert unsafe.rejected["brand safety"] >= 1


def test_without_the_lead_a_missing_brand_is_rejected(engine):
    written = write_copy(engine, Brief("cheap flights", "Zqxwv Unlikelyname"), n=2, lead=False)
    assert written.rejected["brand missing"] >= 1 and written.accepted == []


def test_bad_briefs_are_refused():
    with pytest.raises(ValueError, match="brief"):
        Brief("", "Acme")
    with pytest.raises(ValueError, match="brand"):
        Brief("a brief", "")
