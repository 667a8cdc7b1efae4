"""`myna sft`: supervised fine-tuning of a pre-trained run on chat dialogues (OpenAI messages).

Data: DIR/dialogues.jsonl (from `myna data prepare`) or any JSONL file of {"messages": [...]} records. A line that
is not such a record is quarantined in OUT/rejects.jsonl with its file, line and reason; training goes on with the
rest. Each dialogue is rendered with the chat template, and only assistant output (the text of assistant turns and
the <|end|> closing them) is a target: every other position has target -1.

Packing: the conversations of an epoch, in a shuffled order, fill rows of seq_len positions one after another; a
conversation that does not fit in what is left of a row starts the next row (the rest is padding). doc_ids tell the
model where each conversation begins, so attention never crosses two conversations.

Truncation: a conversation longer than seq_len + 1 tokens keeps its newest turns (and every system message), the
way `template.render_prompt` fits a prompt at inference, so the model learns replies with the context it will see
when serving. If the newest turn alone is too long, its end is cut. Both are counted.

Held-out split: a dialogue is held out when the hash of its first non-system message falls in the lowest 5%
(at least a few dialogues), so branches of one reply tree, which share their opening, land on the same side, and
adding data never moves a dialogue between sides. Evaluation: mean loss over the assistant tokens of the held-out
dialogues (the first eval_batches batches per rank of them).

Fine-tuning defaults, from the base run's training settings: peak lr 1/10 of the base's (fine-tuning moves a
trained model, large steps would undo pre-training), no weight decay (it pulls weights towards zero, not towards
the base), grad_accum 1 (chat sets are small; more updates beat bigger batches), one epoch of the training
dialogues (more epochs memorise small chat sets), 5% warmup, an evaluation and a checkpoint every 10% of the steps.
"""

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from myna.data.loader import epoch_order
from myna.model import lm_loss
from myna.runs import load_model, start_run
from myna.template import Rendered, check_messages, render
from myna.tokenizer import Tokenizer
from myna.train import distributed
from myna.train.distributed import Dist
from myna.train.loop import train
from myna.train.tuning import (
    EpochStream,
    base_settings,
    lengths_fingerprint,
    read_and_split,
    schedule_for,
    tuned_config,
    write_rejects,
)

LR_SCALE = 0.1  # fine-tuning peak lr = the base run's peak lr x this


# ---------------------------------------------------------------------------------------------------------------
# Dialogues


def parse_dialogue(rec: dict) -> dict:
    messages = check_messages(rec.get("messages"), "messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("messages: no assistant message, so nothing to learn")
    return {"messages": messages}


# ---------------------------------------------------------------------------------------------------------------
# Dialogues -> training examples


def fit_turns(r: Rendered, limit: int) -> tuple[list, list, str]:
    """At most `limit` tokens of a rendered conversation: "kept", "dropped" (oldest non-system turns left out)
    or "cut" (the newest turn alone was too long and lost its end)."""
    if len(r.ids) <= limit:
        return r.ids, r.targets, "kept"
    system = [(a, b) for a, b, role in r.turns if role == "system"]
    start = r.turns[0][0]  # the format's start (<|bos|>) comes before every turn
    room = limit - start - sum(b - a for a, b in system)
    keep = set(system)
    for a, b, role in reversed(r.turns):
        if role == "system":
            continue
        if b - a > room:
            break
        keep.add((a, b))
        room -= b - a
    status = "dropped"
    if keep == set(system):  # not even the newest turn fits: keep its beginning
        keep.add(r.turns[-1][:2])
        status = "cut"
    chosen = [*range(start), *(i for a, b, _ in r.turns if (a, b) in keep for i in range(a, b))][:limit]
    return [r.ids[i] for i in chosen], [r.targets[i] for i in chosen], status


def calls_tool(dialogue: dict) -> bool:
    return any(m.get("tool_calls") for m in dialogue["messages"])


def encode_dialogue(messages: list[dict], tok: Tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(x, y) of one conversation, at most seq_len long: y[i] = x's next token where it is assistant output, else
    -1; and fit_turns' status."""
    r = render(messages, tok)
    ids, learn, status = fit_turns(r, seq_len + 1)
    ids_a, learn_a = np.asarray(ids, dtype=np.int64), np.asarray(learn, dtype=bool)
    return ids_a[:-1], np.where(learn_a[1:], ids_a[1:], -1), status


def encode_dialogues(dialogues: list[dict], tok: Tokenizer, seq_len: int) -> tuple[list, Counter]:
    """Examples for PackedLoader, and counts of dropped/cut conversations and of those left with no target."""
    examples, stats = [], Counter()
    for d in dialogues:
        x, y, status = encode_dialogue(d["messages"], tok, seq_len)
        stats[status] += 1
        if (y >= 0).any():
            examples.append((x, y))
        else:  # e.g. an assistant turn opens the dialogue and the user turns after it were kept
            stats["no_target"] += 1
    return examples, stats


# ---------------------------------------------------------------------------------------------------------------
# Loaders


class PackedLoader:
    """Endless (x, y, doc_ids) int64 batches [batch_size, seq_len] of conversations packed into rows.

    `examples` are (x, y) arrays of at most seq_len tokens. Each epoch packs them in the order of a permutation
    drawn from (shuffle_seed, epoch) (in order when shuffle_seed is None); see the module docstring. Padding is
    pad_id with target -1 and a doc id of its own. state_dict/load_state_dict resume the stream exactly.
    """

    def __init__(
        self,
        examples: list[tuple[np.ndarray, np.ndarray]],
        batch_size: int,
        seq_len: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        shuffle_seed: int | None = None,
        repeat: bool = True,
    ):
        if not examples:
            raise ValueError("no examples to load")
        too_long = [i for i, (x, _) in enumerate(examples) if len(x) > seq_len]
        if too_long:
            raise ValueError(
                f"{len(too_long)} examples exceed seq_len={seq_len} (the first is #{too_long[0]})"
            )
        self.examples, self.batch_size, self.seq_len, self.pad_id = examples, batch_size, seq_len, pad_id
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.shuffle_seed = shuffle_seed
        self.lengths = [len(x) for x, _ in examples]
        self.stream = EpochStream(self._pack, repeat)
        self.rows_per_epoch = len(self.stream.items(0))
        self.batches_per_epoch = math.ceil(self.rows_per_epoch / (batch_size * world_size))

    def _pack(self, epoch: int) -> list[list[int]]:
        """The rows of `epoch`: lists of example indices, filled in order until the next one does not fit."""
        rows, row, used = [], [], 0
        for i in epoch_order(len(self.examples), self.shuffle_seed, epoch).tolist():
            if used + self.lengths[i] > self.seq_len:
                rows.append(row)
                row, used = [], 0
            row.append(int(i))
            used += self.lengths[i]
        rows.append(row)
        return rows

    def _row(self, members: list[int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        y = np.full(self.seq_len, -1, dtype=np.int64)
        doc = np.zeros(self.seq_len, dtype=np.int64)
        at = 0
        for k, i in enumerate(members or []):
            ex, ey = self.examples[i]
            x[at : at + len(ex)], y[at : at + len(ex)], doc[at : at + len(ex)] = ex, ey, k
            at += len(ex)
        doc[at:] = len(members or [])  # padding is a document of its own
        return x, y, doc

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        step = self.stream.take(self.batch_size * self.world_size)
        rows = [self._row(m) for m in step[self.rank :: self.world_size]]
        return tuple(torch.from_numpy(np.stack(parts)).to(self.device) for parts in zip(*rows, strict=True))

    def state_dict(self) -> dict:
        return self.stream.state_dict(**self._settings())

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state, "resume with the same --data and seq_len", **self._settings())

    def _settings(self) -> dict:
        """What a saved position is valid under."""
        return {
            "seq_len": self.seq_len,
            "shuffle_seed": self.shuffle_seed,
            "examples": lengths_fingerprint(self.lengths),
        }


# ---------------------------------------------------------------------------------------------------------------
# Loss and evaluation


def assistant_loss_fn(dist: Dist) -> Callable:
    """Mean cross-entropy over the assistant tokens of the whole step (all ranks' micro-batches together).

    Each rank divides its summed nats by the step's token count over all ranks (times world_size, since DDP and
    FSDP average gradients): rows hold different numbers of assistant tokens, and a per-rank mean would weigh a
    token by how crowded its rank's batch was, so 2 ranks would not train like 1 process.
    """

    def loss_fn(model, batch):
        x, y, doc = batch
        logits = model(x, doc_ids=doc)
        nats = lm_loss(logits, y, "sum")
        (tokens,) = dist.sum([float((y >= 0).sum())])
        return nats * dist.world_size / max(tokens, 1.0)

    return loss_fn


def assistant_eval_fn(dist: Dist, max_batches: int) -> Callable:
    """val_loss: mean cross-entropy over the held-out assistant tokens (every rank runs the same batch count)."""

    @torch.no_grad()
    def eval_fn(model, val_loader: PackedLoader, autocast) -> dict:
        model.eval()
        nats = tokens = 0.0
        for _ in range(min(val_loader.batches_per_epoch, max_batches)):
            x, y, doc = next(val_loader)
            with autocast():
                logits = model(x, doc_ids=doc)
            nats += float(lm_loss(logits, y, "sum"))
            tokens += float((y >= 0).sum())
        model.train()
        nats, tokens = dist.sum([nats, tokens])
        return {"val_loss": nats / max(tokens, 1.0)}

    return eval_fn


# ---------------------------------------------------------------------------------------------------------------
# The command


def sft(
    base: str | Path,  # pre-trained run (or one of its checkpoints)
    data: str | Path,  # data directory (its dialogues.jsonl) or a JSONL file of OpenAI-messages records
    out: str | Path,  # run directory for the tuned model
    steps: int | None = None,  # optimizer steps (default: scaled to the data)
    resume: bool | str = False,  # continue from the newest checkpoint in out, or from the one named (step_N)
    parallel: Literal["none", "ddp", "fsdp", "hsdp"] = "none",  # data parallelism (run under torchrun)
    compile: bool = False,  # torch.compile the model
    tool_repeat: int = 1,  # times each training dialogue with a tool call appears an epoch (they are few)
    on_step=None,
    **overrides,
) -> dict:
    """Fine-tune the run (or checkpoint) `base` on the dialogues in `data`; returns the last metrics record.

    `data`: a directory holding dialogues.jsonl, or a JSONL file of {"messages": [...]} records. `overrides` set
    TrainConfig fields by name (lr, batch_size, seq_len, eval_every, ...). OUT gets config.json ("stage": "sft"),
    tokenizer.json, metrics.jsonl, checkpoints/ and rejects.jsonl when lines were rejected. resume=True continues
    the newest checkpoint in OUT. `on_step(step, record)` is called after every optimizer step.
    """
    out = Path(out)
    base_run, base_ckpt, base_config = base_settings(base)
    path, dialogues, rejects, side = read_and_split(
        data, "dialogues.jsonl", parse_dialogue, "messages", "dialogue"
    )

    if steps is not None:
        overrides["steps"] = steps
    dist = distributed.setup(parallel)
    try:
        loaded = load_model(base_ckpt, dist.device)
        tok, mcfg = loaded.tokenizer, loaded.config
        tcfg = tuned_config(base_config["train"], LR_SCALE, {**overrides, "compile": compile}, mcfg)

        train_d = [d for d, v in zip(dialogues, side, strict=True) if not v]
        if not 1 <= tool_repeat <= 100:
            raise ValueError(f"tool_repeat: expected 1..100, got {tool_repeat}")
        # a model that sees a call in 2.5% of its dialogues (the sample's share) learns to answer without it
        train_d += [d for d in train_d if calls_tool(d)] * (tool_repeat - 1)
        val_d = [d for d, v in zip(dialogues, side, strict=True) if v]
        train_set, stats = encode_dialogues(train_d, tok, tcfg.seq_len)
        val_set, val_stats = encode_dialogues(val_d, tok, tcfg.seq_len)
        if not train_set or not val_set:
            raise ValueError(
                f"{path}: no dialogue with an assistant token left in the train or held-out split"
            )
        loader_args = (tcfg.batch_size, tcfg.seq_len, tok.pad_id, dist.rank, dist.world_size, dist.device)
        train_loader = PackedLoader(train_set, *loader_args, shuffle_seed=tcfg.seed)
        val_loader = PackedLoader(val_set, *loader_args, repeat=False)
        epoch_steps = math.ceil(
            train_loader.rows_per_epoch / (tcfg.batch_size * tcfg.grad_accum * dist.world_size)
        )
        tcfg = schedule_for(tcfg, overrides.get("steps", epoch_steps), overrides)

        data_stats = {
            "dialogues": len(dialogues),
            "rejected_lines": len(rejects),
            "train": len(train_set),
            "held_out": len(val_set),
            "truncated_turns_dropped": stats["dropped"] + val_stats["dropped"],
            "truncated_turn_cut": stats["cut"] + val_stats["cut"],
            "no_target": stats["no_target"] + val_stats["no_target"],
            "tool_dialogues": sum(map(calls_tool, train_d)),
            "tool_repeat": tool_repeat,
            "rows_per_epoch": train_loader.rows_per_epoch,
            "fill": sum(train_loader.lengths) / (train_loader.rows_per_epoch * tcfg.seq_len),
        }
        info = {"stage": "sft", "base": str(base_ckpt), "data": str(path), "data_stats": data_stats}
        start_run(out, resume, mcfg, tcfg, base_run / "tokenizer.json", dist, **info)
        write_rejects(out, rejects, "dialogue lines", dist)
        dist.log(
            f"sft: {len(train_set):,} dialogues ({train_loader.rows_per_epoch:,} packed rows, "
            f"{100 * data_stats['fill']:.0f}% filled), {len(val_set):,} held out; "
            f"{data_stats['truncated_turns_dropped'] + data_stats['truncated_turn_cut']} truncated; "
            f"{tcfg.steps} steps at lr {tcfg.lr:.2e}"
        )
        torch.manual_seed(tcfg.seed)
        model = loaded.model.train()
        record = train(
            model,
            tcfg,
            train_loader,
            val_loader,
            out,
            dist=dist,
            loss_fn=assistant_loss_fn(dist),
            eval_fn=assistant_eval_fn(dist, tcfg.eval_batches),
            on_step=on_step,
            resume=resume,
            extra_state={"model_config": asdict(mcfg), "stage": "sft"},
        )
        dist.log(f"[green]sft finished: step {record.get('step')}, held-out loss {record.get('val_loss')}")
        return record
    finally:
        distributed.teardown(dist)
