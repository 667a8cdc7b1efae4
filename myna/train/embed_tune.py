"""`myna embed-tune`: teach a run to embed posts, so that search's dense retrieval finds what belongs together.

An embedding is what `Engine.embed` returns (and `/v1/embeddings` serves): a text's ids as a document (<|bos|> +
its ids), the final hidden states mean-pooled over its positions, L2-normalised. Training computes exactly that, so
the tuned weights improve those vectors and nothing else has to change.

Data: the pairs of `myna.data.pairs`, from the data directory's train split (corpus.parquet's "train" posts and the
dialogues SFT trains on); the same kinds mined from the held-out side (corpus "val" posts, SFT's held-out
dialogues) measure retrieval. A batch holds batch_pairs pairs with no text twice and no two pairs of one group
(thread, dialogue, hashtag): every other text in it is a true negative.

Loss: symmetric InfoNCE with in-batch negatives, each text's partner against the other side's texts, both ways
(a -> b and b -> a averaged), plus lm_weight x the ordinary next-token loss on the same texts, from the same forward
pass, so the model keeps its language while its pooled states move. The learning rate is small (the run's own x
LR_SCALE) for the same reason.

Measured before training (the step-0 record of metrics.jsonl) and at every evaluation: retrieval on held-out pairs
(each text's partner ranked among the partners of the other held-out pairs: MRR and recall@1, overall and by
kind), and the held-out assistant loss on SFT's held-out dialogues (as `myna sft` and `myna eval` measure it). At
the end a greedy reply from the engine shows the run still chats, and a rise of the assistant loss beyond
max_chat_loss_rise is reported as a warning.
"""

import json
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xxhash

from myna.data.loader import epoch_order
from myna.data.pairs import (
    KINDS,
    Pair,
    corpus_pairs,
    count_kinds,
    dialogue_pairs,
    read_corpus,
    text_key,
    unique,
)
from myna.infer.engine import embed_ids
from myna.io import atomic_write
from myna.model import lm_loss, mean_pool, pad_right
from myna.runs import load_model, read_metrics, start_run
from myna.tokenizer import Tokenizer
from myna.train import distributed
from myna.train.distributed import Dist
from myna.train.loop import autocast_dtype, train
from myna.train.sft import PackedLoader, assistant_eval_fn, encode_dialogues, parse_dialogue
from myna.train.tuning import (
    EpochStream,
    base_settings,
    lengths_fingerprint,
    opening,
    read_and_split,
    schedule_for,
    tuned_config,
    write_rejects,
)

LR_SCALE = 0.3  # peak lr = the tuned run's own peak lr x this: small steps keep the chat model it was
CHAT_PROMPT = "my flight was cancelled and nobody at the gate can tell me anything"


# ---------------------------------------------------------------------------------------------------------------
# Pairs -> batches


class PairLoader:
    """Endless batches of pairs: (ids [2n, T] right-padded, lengths [2n]); rows 0..n-1 are the pairs' first
    texts, rows n..2n-1 their partners.

    Each epoch takes the pairs in a permutation drawn from (seed, epoch) and fills batches of batch_pairs in that
    order; a pair that would repeat a text or a group of the batch waits for the next one. state_dict and
    load_state_dict resume the stream exactly, as PackedLoader's do.
    """

    def __init__(
        self,
        pairs: list[Pair],
        ids: list[tuple[list[int], list[int]]],
        batch_pairs: int,
        pad_id: int,
        seed: int,
        device: str | torch.device = "cpu",
    ):
        if batch_pairs < 2:
            raise ValueError(f"batch_pairs={batch_pairs}: in-batch negatives need at least 2 pairs a batch")
        self.pairs, self.ids, self.batch_pairs, self.pad_id = pairs, ids, batch_pairs, pad_id
        self.seed, self.device = seed, torch.device(device)
        self.keys = [(text_key(p.a), text_key(p.b), p.group) for p in pairs]
        self.stream = EpochStream(self._batches)
        self.batches_per_epoch = len(self.stream.items(0))

    def _batches(self, epoch: int) -> list[list[int]]:
        fresh = deque(epoch_order(len(self.pairs), self.seed, epoch).tolist())
        waiting: deque = deque()
        batches = []
        while fresh or waiting:
            batch, taken, conflicts = [], set(), deque()
            for source in (waiting, fresh):  # pairs that waited go first
                while source and len(batch) < self.batch_pairs:
                    i = source.popleft()
                    if taken.isdisjoint(self.keys[i]):
                        batch.append(i)
                        taken.update(self.keys[i])
                    else:
                        conflicts.append(i)
            conflicts.extend(waiting)
            waiting = conflicts
            if len(batch) >= 2:  # one pair alone has no negative: it sits this epoch out
                batches.append(batch)
        return batches

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        (members,) = self.stream.take(1)
        texts = [self.ids[i][0] for i in members] + [self.ids[i][1] for i in members]
        idx, lengths = pad_right(texts, self.pad_id)
        return idx.to(self.device), lengths.to(self.device)

    def state_dict(self) -> dict:
        return self.stream.state_dict(**self._settings())

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state, "resume with the same --data and settings", **self._settings())

    def _settings(self) -> dict:
        """What a saved position is valid under."""
        lengths = [len(a) + len(b) for a, b in self.ids]
        return {"batch_pairs": self.batch_pairs, "seed": self.seed, "pairs": lengths_fingerprint(lengths)}


def tokenize_pairs(pairs: list[Pair], tok: Tokenizer, max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """Each pair's two texts as documents (<|bos|> + ids, as Engine.embed sees a text), at most max_tokens long."""
    encoded = tok.encode_batch([t for p in pairs for t in (p.a, p.b)])
    docs = [[tok.bos_id, *ids][:max_tokens] for ids in encoded]
    return list(zip(docs[0::2], docs[1::2], strict=True))


# ---------------------------------------------------------------------------------------------------------------
# Loss and evaluation


def pooled(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Engine.embed's vectors from the trunk's states: mean over each row's real positions, in fp32, unit length."""
    return F.normalize(mean_pool(hidden.float(), lengths), dim=-1)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of unit vectors a[i] <-> b[i] against the batch's other rows, and the share of rows whose
    partner scores highest (both directions)."""
    logits = a @ b.T / temperature
    labels = torch.arange(len(a), device=a.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    hits = (logits.argmax(1) == labels).float().mean() + (logits.argmax(0) == labels).float().mean()
    return loss, hits / 2


def embed_loss_fn(temperature: float, lm_weight: float):
    """The loop's loss: InfoNCE of the batch's pairs + lm_weight x next-token loss on its texts, one forward."""

    def loss_fn(model, batch):
        idx, lengths = batch
        hidden = model.hidden(idx)
        emb = pooled(hidden, lengths)
        n = len(idx) // 2
        contrastive, accuracy = info_nce(emb[:n], emb[n:], temperature)
        targets = idx[:, 1:].masked_fill(
            torch.arange(1, idx.size(1), device=idx.device) >= lengths[:, None], -1
        )
        lm = lm_loss(model.lm_head(hidden[:, :-1]), targets)
        stats = {"contrastive": contrastive.detach(), "lm_loss": lm.detach(), "batch_accuracy": accuracy}
        return contrastive + lm_weight * lm, stats

    return loss_fn


def retrieval(model, pairs: list[Pair], ids: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Each text's partner ranked among the partners of all the pairs (both directions): MRR and recall@1, overall
    and for each kind present. The vectors are the engine's own (embed_ids), which `pooled` trains."""
    a = embed_ids(model, [x for x, _ in ids], pad_id)
    b = embed_ids(model, [y for _, y in ids], pad_id)
    ranks = []
    for queries, keys in ((a, b), (b, a)):
        scores = queries @ keys.T
        ranks.append(1 + (scores > scores.diagonal()[:, None]).sum(1).cpu())
    rank = torch.cat(ranks).double()
    kinds = np.array([p.kind for p in pairs] * 2)
    result = {"mrr": float((1 / rank).mean()), "recall_at_1": float((rank == 1).double().mean())}
    for kind in sorted(set(kinds)):
        result[f"mrr_{kind}"] = float((1 / rank[torch.from_numpy(kinds == kind)]).mean())
    return result


def eval_pairs(pairs: list[Pair], limit: int) -> list[Pair]:
    """At most `limit` held-out pairs, no text in two of them (a text would otherwise be its own candidate), in an
    order fixed by their texts."""
    chosen, seen = [], set()
    for p in sorted(pairs, key=lambda p: xxhash.xxh64(f"{p.a}\0{p.b}".encode()).intdigest()):
        keys = {text_key(p.a), text_key(p.b)}
        if not keys & seen:
            chosen.append(p)
            seen |= keys
            if len(chosen) == limit:
                break
    return chosen


class HeldOut:
    """What an evaluation reads: the held-out pairs and, when the data has dialogues, SFT's held-out ones packed
    (the loop rewinds it through state_dict / load_state_dict before each evaluation)."""

    def __init__(self, pairs, ids, pad_id: int, chat: PackedLoader | None, chat_batches: int, dist: Dist):
        self.pairs, self.ids, self.pad_id, self.chat = pairs, ids, pad_id, chat
        self.chat_eval = assistant_eval_fn(dist, chat_batches)

    def state_dict(self) -> dict:
        return self.chat.state_dict() if self.chat else {}

    def load_state_dict(self, state: dict) -> None:
        if self.chat:
            self.chat.load_state_dict(state)

    def evaluate(self, model, autocast) -> dict:
        model.eval()
        with autocast():
            found = retrieval(model, self.pairs, self.ids, self.pad_id)
        record = {f"val_{k}": v for k, v in found.items()}
        if self.chat:
            record["val_chat_loss"] = self.chat_eval(model, self.chat, autocast)["val_loss"]
        model.train()
        return record


def chat_reply(model, tok: Tokenizer, prompt: str = CHAT_PROMPT) -> dict:
    """The engine's greedy reply to one user turn: the tuned run still chats."""
    from myna.infer.engine import Engine, SamplingParams, cpu_threads
    from myna.template import render_prompt, turn_stop_ids

    params = SamplingParams(max_tokens=48, temperature=0, stop_token_ids=turn_stop_ids(tok))
    device = next(model.parameters()).device
    with cpu_threads(device), Engine(model.eval(), tok, max_batch=1) as engine:
        result = engine.submit(render_prompt([{"role": "user", "content": prompt}], tok).ids, params).result()
    return {"prompt": prompt, "reply": result.text, "finish_reason": result.finish_reason}


# ---------------------------------------------------------------------------------------------------------------
# The command


def read_dialogues(data: Path) -> tuple[list[dict], list[bool], list]:
    """The data directory's dialogues, which of them SFT holds out, and the lines rejected (none without a file)."""
    if not (data / "dialogues.jsonl").is_file():
        return [], [], []
    _, dialogues, rejects, side = read_and_split(
        data, "dialogues.jsonl", parse_dialogue, "messages", "dialogue"
    )
    return dialogues, side, rejects


def mine(
    data: Path, dialogues: list[dict], side: list[bool], max_tag_posts: int, kinds: str = ",".join(KINDS)
) -> tuple[dict, dict]:
    """split -> the pairs of the given kinds (comma-separated) in a data directory and its dialogues, and their
    counts (and what was left out)."""
    wanted = [k.strip() for k in kinds.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in KINDS]
    if unknown or not wanted:
        raise ValueError(f"kinds={kinds!r}: expected a comma-separated subset of {', '.join(KINDS)}")
    corpus_path = data / "corpus.parquet"
    if not corpus_path.is_file():
        raise FileNotFoundError(f"{corpus_path}: missing; expected the corpus `myna data prepare` writes")
    pairs, dropped = corpus_pairs(read_corpus(corpus_path), max_tag_posts)
    turns = dialogue_pairs(dialogues, [opening(d["messages"]) for d in dialogues], side)
    pairs = {
        split: [p for p in unique(pairs.get(split, []) + turns.get(split, [])) if p.kind in wanted]
        for split in ("train", "val")
    }
    counts = {split: count_kinds(found) for split, found in pairs.items()}
    if not pairs["train"]:
        raise ValueError(
            f"{data}: no training pairs found; expected replies (in_reply_to_id) or quotes (quoted_id) within "
            "corpus.parquet, posts sharing a hashtag, or dialogues.jsonl"
        )
    if len(pairs["val"]) < 2:
        raise ValueError(
            f"{data}: {len(pairs['val'])} held-out pair(s) found; retrieval needs at least 2 from the val split "
            "of corpus.parquet or the held-out dialogues"
        )
    return pairs, {**counts, **dict(dropped)}


def embed_tune(
    ckpt: str
    | Path,  # the run to tune (its newest checkpoint) or one of its checkpoints: a chat run, usually
    data: str | Path,  # data directory: corpus.parquet (and dialogues.jsonl) from `myna data prepare`
    out: str | Path,  # run directory for the tuned model
    steps: int | None = None,  # optimizer steps (default: one epoch of the training pairs, at most 300)
    batch_pairs: int = 32,  # pairs per step; each text is scored against the 2 x batch_pairs - 1 others
    # InfoNCE temperature: cosines span [-1, 1], and 0.05 stretches them to +-20 logits, sharp enough to single
    # out the partner among the batch (SimCSE's and E5's choice)
    temperature: float = 0.05,
    lm_weight: float = 1.0,  # weight of the next-token loss on the same texts, which keeps the model's language
    max_tag_posts: int = 10,  # a hashtag on more posts than this names a broad topic, not what two posts share
    # the kinds of pairs to train on: search wants posts about the same thing (hashtag, reply, quote); dialogue
    # turns teach what answers a text, and keep the chat's own turns close
    kinds: str = "reply,quote,hashtag,query,dialogue",
    max_tokens: int = 128,  # a text's first tokens that count (<|bos|> included)
    held_out_pairs: int = 1000,  # held-out pairs whose retrieval is measured
    max_chat_loss_rise: float = 0.05,  # nats of held-out assistant loss the tuning may cost before it warns
    resume: bool | str = False,  # continue from the newest checkpoint in out, or from the one named (step_N)
    on_step=None,
    **overrides,
) -> dict:
    """Tune `ckpt` to embed the pairs mined from `data`; returns the summary: pair counts by kind, retrieval and
    held-out assistant loss before and after, the engine's reply.

    OUT gets config.json ("stage": "embed-tune", "base": what it was tuned from, the pair counts), tokenizer.json,
    metrics.jsonl (step 0 before training, then each step), checkpoints/. `overrides` set TrainConfig fields (lr,
    eval_every, ...). Bad input (no data directory, no corpus, no pairs) raises before OUT is touched.
    """
    out, data = Path(out), Path(data)
    base_run, base_ckpt, base_config = base_settings(ckpt)
    if not data.is_dir():
        raise FileNotFoundError(f"{data}: no such data directory (expected `myna data prepare`'s output)")
    dialogues, side, rejects = read_dialogues(data)
    pairs, counts = mine(data, dialogues, side, max_tag_posts, kinds)
    if steps is not None:
        overrides["steps"] = steps
    # one process (a short tuning of a small model): the loss calls model.hidden, which no DDP wrapper sees
    dist = distributed.setup("none")
    try:
        loaded = load_model(base_ckpt, dist.device)
        tok, mcfg = loaded.tokenizer, loaded.config
        chat_shape = (
            base_config["train"]["batch_size"],
            min(base_config["train"]["seq_len"], mcfg.max_seq_len),
        )
        max_tokens = min(max_tokens, mcfg.max_seq_len)
        # batch_size x seq_len: the text slots of a step, from which the loop reports tokens/s
        shape = {"batch_size": 2 * batch_pairs, "seq_len": max_tokens}
        tcfg = tuned_config(base_config["train"], LR_SCALE, {**shape, **overrides}, mcfg)

        train_pairs, val_pairs = pairs["train"], eval_pairs(pairs["val"], held_out_pairs)
        loader = PairLoader(
            train_pairs, tokenize_pairs(train_pairs, tok, max_tokens), batch_pairs, tok.pad_id, tcfg.seed
        )
        tcfg = schedule_for(tcfg, overrides.get("steps", min(loader.batches_per_epoch, 300)), overrides)
        held_out = HeldOut(
            val_pairs,
            tokenize_pairs(val_pairs, tok, max_tokens),
            tok.pad_id,
            chat_loader(dialogues, side, tok, chat_shape, dist),
            tcfg.eval_batches,
            dist,
        )
        settings = {
            "temperature": temperature,
            "lm_weight": lm_weight,
            "batch_pairs": batch_pairs,
            "max_tag_posts": max_tag_posts,
            "kinds": kinds,
            "max_tokens": max_tokens,
            "max_chat_loss_rise": max_chat_loss_rise,
        }
        data_stats = {
            "pairs": counts,
            "held_out_pairs": len(val_pairs),
            "batches_per_epoch": loader.batches_per_epoch,
        }
        info = {"stage": "embed-tune", "base": str(base_ckpt), "data": str(data), "data_stats": data_stats}
        start_run(out, resume, mcfg, tcfg, base_run / "tokenizer.json", dist, embed=settings, **info)
        write_rejects(out, rejects, "dialogue lines", dist)
        dist.log(
            "embed-tune: training pairs "
            + ", ".join(f"{kind} {n:,}" for kind, n in counts["train"].items())
            + f"; {len(val_pairs):,} held out; {tcfg.steps} steps of {batch_pairs} pairs at lr {tcfg.lr:.2e}"
        )
        model = loaded.model
        amp = autocast_dtype(tcfg.dtype, dist.device)
        autocast = (lambda: torch.autocast(dist.device.type, dtype=amp)) if amp else nullcontext
        before = _before(out, model, held_out, counts, autocast)
        torch.manual_seed(tcfg.seed)
        # resume=True on a fresh OUT finds no checkpoint and starts at step 0, keeping the record _before wrote
        record = train(
            model.train(),
            tcfg,
            loader,
            held_out,
            out,
            dist=dist,
            loss_fn=embed_loss_fn(temperature, lm_weight),
            eval_fn=lambda m, held, ac: held.evaluate(m, ac),
            on_step=on_step,
            resume=resume or True,
            extra_state={"model_config": asdict(mcfg), "stage": "embed-tune"},
        )
        return _summary(model, tok, counts, before, record, max_chat_loss_rise, dist)
    finally:
        distributed.teardown(dist)


def chat_loader(dialogues, side, tok: Tokenizer, shape: tuple[int, int], dist: Dist) -> PackedLoader | None:
    """SFT's held-out dialogues, packed as SFT evaluated them: `shape` is its (batch_size, seq_len). None when
    there are none."""
    batch_size, seq_len = shape
    examples, _ = encode_dialogues([d for d, v in zip(dialogues, side, strict=True) if v], tok, seq_len)
    if not examples:
        return None
    return PackedLoader(examples, batch_size, seq_len, tok.pad_id, device=dist.device, repeat=False)


def _before(out: Path, model, held_out: HeldOut, counts: dict, autocast) -> dict:
    """The step-0 record (pair counts, the untuned model's held-out numbers), written first to metrics.jsonl; a
    resumed run reads it back."""
    found = next((r for r in read_metrics(out) if r["step"] == 0), None)
    if found is not None:
        return found
    state = held_out.state_dict()
    record = {"step": 0, **held_out.evaluate(model, autocast)}
    held_out.load_state_dict(state)
    record.update({f"pairs_{kind}": n for kind, n in counts["train"].items()})
    with atomic_write(out / "metrics.jsonl", "w") as f:
        f.write(json.dumps(record) + "\n")
    return record


def _summary(model, tok, counts, before: dict, after: dict, bound: float, dist: Dist) -> dict:
    keys = [k for k in before if k.startswith("val_")]
    summary = {
        "pairs": counts,
        "before": {k: before[k] for k in keys},
        "after": {k: after.get(k) for k in keys},
        "chat": chat_reply(model, tok),
    }
    changes = ", ".join(
        f"{k[4:]} {before[k]:.4f} -> {after[k]:.4f}" for k in keys if after.get(k) is not None
    )
    dist.log(f"[green]embed-tune finished: step {after.get('step')}; held-out {changes}")
    if "val_chat_loss" in before and after.get("val_chat_loss") is not None:
        rise = after["val_chat_loss"] - before["val_chat_loss"]
        summary["chat_loss_rise"] = rise
        if rise > bound:
            dist.log(f"[yellow]held-out assistant loss rose {rise:.4f} nats, over max_chat_loss_rise={bound}")
    dist.log(f"reply to {summary['chat']['prompt']!r}: {summary['chat']['reply']!r}")
    return summary
