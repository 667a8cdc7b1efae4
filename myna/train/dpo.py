"""`myna dpo`: Direct Preference Optimization of an SFT run against a frozen copy of itself.

Data: DIR/prefs.jsonl (from `myna data prepare`) or any JSONL file of {"prompt": [messages], "chosen": text,
"rejected": text} records; bad lines are quarantined in OUT/rejects.jsonl (file, line, reason) as in SFT.

A pair is rendered with the chat template as prompt + one assistant turn holding the chosen (or the rejected)
reply; a reply's log-probability is summed over its tokens, the closing <|end|> included. With policy log-probs
pc, pr and reference log-probs rc, rr of the chosen and rejected replies, the loss of a pair is

    -log sigmoid(beta * ((pc - rc) - (pr - rr)))

(Rafailov et al., 2023); beta * (pc - rc) is the chosen reply's implicit reward, and the reward margin is the
chosen reward minus the rejected one. The reference is the base run's model, frozen (eval mode, no gradients, a
plain module on every rank even under DDP/FSDP); its log-probs are computed on the fly, one extra forward pass
without a backward (about a third more compute than precomputing them, and no second pass over the data).

A prompt too long for seq_len + 1 tokens together with the longer reply loses its oldest turns, exactly as
`template.render_prompt` fits a prompt at inference (system messages kept); a reply longer than half of that is
cut at the end first (both counted). Chosen and rejected rows of a batch are padded with pad_id (target -1) to
the longest row of the batch.

Held-out pairs: those whose prompt's first non-system message hashes into the lowest 5% (pairs of one prompt stay
together). Each evaluation reports val_loss, val_reward_margin (mean), val_pair_accuracy (share of pairs with a
positive margin) and the mean chosen log-prob under the policy and the reference; training records carry the
step's reward_margin and pair_accuracy.

Defaults, from the SFT run's training settings: peak lr 1/10 of the SFT run's (DPO's gradients are large once the
policy moves: published recipes use 5e-7 against 2e-5 for SFT), beta 0.1, otherwise as SFT (one epoch, 5%
warmup, no weight decay, an evaluation and a checkpoint every 10% of the steps).
"""

import copy
import math
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from myna.data.loader import epoch_order
from myna.data.schema import Reject
from myna.runs import load_model, start_run
from myna.template import check_messages, render, render_prompt, reply_opener
from myna.tokenizer import Tokenizer
from myna.train import distributed, tuning
from myna.train.distributed import Dist
from myna.train.loop import train

LR_SCALE = 0.1  # DPO peak lr = the SFT run's peak lr x this
DEFAULT_BETA = 0.1


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and reward margin beta * ((pc - rc) - (pr - rr)), from summed reply log-probs."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin), margin


def reply_logprobs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's targets (y >= 0) given x: [rows]."""
    logits = model(x).float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return (logp * (y >= 0)).sum(dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Pairs


def parse_pair(rec: dict) -> dict:
    prompt = check_messages(rec.get("prompt"), "prompt")
    replies = {}
    for key in ("chosen", "rejected"):
        text = rec.get(key)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{key}: expected a non-empty string, got {type(text).__name__}")
        replies[key] = text
    if replies["chosen"] == replies["rejected"]:
        raise ValueError("chosen and rejected are the same text")
    return {"prompt": prompt, **replies}


def encode_pair(pair: dict, tok: Tokenizer, seq_len: int) -> tuple[list, dict]:
    """[(x, y) chosen, (x, y) rejected] with y = -1 outside the reply, and which truncations happened."""
    prompt_len = len(render(pair["prompt"], tok).ids) + len(reply_opener(tok))  # + the reply's opener
    limit = seq_len + 1
    replies, flags = [], {"reply_cut": False, "prompt_shortened": False}
    for key in ("chosen", "rejected"):
        full = render([*pair["prompt"], {"role": "assistant", "content": pair[key]}], tok)
        reply = full.ids[prompt_len:]  # text + closer, tokenised as in SFT
        if len(reply) > limit // 2:
            reply, flags["reply_cut"] = reply[: limit // 2], True
        replies.append(reply)
    prompt = render_prompt(pair["prompt"], tok, budget=limit - max(map(len, replies)))
    flags["prompt_shortened"] = prompt.dropped_turns > 0 or prompt.truncated
    rows = []
    for reply in replies:
        ids = np.asarray(prompt.ids + reply, dtype=np.int64)
        y = ids[1:].copy()
        y[: len(prompt.ids) - 1] = -1
        rows.append((ids[:-1], y))
    return rows, flags


class PairLoader:
    """Endless (x, y) batches [2 * batch_size, T]: this rank's chosen rows, then their rejected rows.

    T is the longest row of the batch (padding: pad_id, target -1). The pairs of an epoch come in a permutation
    drawn from (shuffle_seed, epoch), split by rank like TokenLoader; with repeat=False one pass, then empty
    pairs (no target) that evaluation leaves out.
    """

    def __init__(
        self,
        pairs: list[list[tuple[np.ndarray, np.ndarray]]],
        batch_size: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        shuffle_seed: int | None = None,
        repeat: bool = True,
    ):
        if not pairs:
            raise ValueError("no pairs to load")
        self.pairs, self.batch_size, self.pad_id = pairs, batch_size, pad_id
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.shuffle_seed = shuffle_seed
        n = len(pairs)
        self.stream = tuning.EpochStream(lambda e: epoch_order(n, shuffle_seed, e).tolist(), repeat)
        self.batches_per_epoch = math.ceil(n / (batch_size * world_size))
        self._lengths = [len(x) for pair in pairs for x, _ in pair]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.stream.take(self.batch_size * self.world_size)
        empty = (np.array([self.pad_id]), np.array([-1]))
        mine = [
            self.pairs[i] if i is not None else [empty, empty] for i in step[self.rank :: self.world_size]
        ]
        rows = [pair[0] for pair in mine] + [pair[1] for pair in mine]
        T = max(len(x) for x, _ in rows)
        x = np.full((len(rows), T), self.pad_id, dtype=np.int64)
        y = np.full((len(rows), T), -1, dtype=np.int64)
        for r, (rx, ry) in enumerate(rows):
            x[r, : len(rx)], y[r, : len(ry)] = rx, ry
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def state_dict(self) -> dict:
        return {
            "epoch": self.stream.epoch,
            "pos": self.stream.pos,
            "shuffle_seed": self.shuffle_seed,
            "pairs": tuning.lengths_fingerprint(self._lengths),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = {"shuffle_seed": self.shuffle_seed, "pairs": tuning.lengths_fingerprint(self._lengths)}
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            raise ValueError(f"loader state was taken over other pairs (saved {theirs}, now {mine})")
        if not 0 <= state["pos"] < len(self.pairs):
            raise ValueError(f"loader state points past its epoch: {state}")
        self.stream.epoch, self.stream.pos = state["epoch"], state["pos"]


# ---------------------------------------------------------------------------------------------------------------
# Loss and evaluation


def _pair_terms(model, reference, x, y, beta):
    """Per-pair losses, margins, and the policy's and reference's chosen log-probs."""
    policy = reply_logprobs(model, x, y)
    with torch.no_grad():
        ref = reply_logprobs(reference, x, y)
    n = x.size(0) // 2
    losses, margins = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta)
    return losses, margins, policy[:n], ref[:n]


def dpo_loss_fn(reference: nn.Module, beta: float):
    def loss_fn(model, batch):
        losses, margins, _, _ = _pair_terms(model, reference, *batch, beta)
        margins = margins.detach()
        stats = {"reward_margin": margins.mean(), "pair_accuracy": (margins > 0).float().mean()}
        return losses.mean(), stats

    return loss_fn


def dpo_eval_fn(reference: nn.Module, beta: float, dist: Dist, max_batches: int):
    @torch.no_grad()
    def eval_fn(model, val_loader: PairLoader, autocast) -> dict:
        model.eval()
        sums = torch.zeros(6, dtype=torch.float64)
        for _ in range(min(val_loader.batches_per_epoch, max_batches)):
            x, y = next(val_loader)
            with autocast():
                losses, margins, chosen, ref_chosen = _pair_terms(model, reference, x, y, beta)
            real = (y[: x.size(0) // 2] >= 0).any(dim=1)  # padding pairs of the last batch have no reply
            terms = (
                real,
                losses * real,
                margins * real,
                (margins > 0) & real,
                chosen * real,
                ref_chosen * real,
            )
            sums += torch.stack([t.double().sum().cpu() for t in terms])
        model.train()
        n, loss, margin, correct, chosen, ref_chosen = dist.sum(sums.tolist())
        n = max(n, 1.0)
        return {
            "val_loss": loss / n,
            "val_reward_margin": margin / n,
            "val_pair_accuracy": correct / n,
            "val_chosen_logp": chosen / n,
            "val_ref_chosen_logp": ref_chosen / n,
        }

    return eval_fn


# ---------------------------------------------------------------------------------------------------------------
# The command


def _encode_pairs(pairs: list[dict], side: list[bool], tok: Tokenizer, seq_len: int, rejects: list[Reject]):
    """({held out?: encoded pairs}, prompts shortened, replies cut); a pair that cannot be encoded (e.g. a system
    prompt that leaves no room for the reply) joins `rejects`."""
    encoded: dict[bool, list] = {True: [], False: []}
    shortened = cut = 0
    for pair, is_val in zip(pairs, side, strict=True):
        try:
            rows, flags = encode_pair(pair, tok, seq_len)
        except ValueError as e:
            file, _, line = pair["where"].rpartition(":")
            rejects.append(Reject(file, int(line), str(e)))
            continue
        encoded[is_val].append(rows)
        shortened += flags["prompt_shortened"]
        cut += flags["reply_cut"]
    return encoded, shortened, cut


def dpo(
    base: str | Path,  # SFT run (also the frozen reference)
    data: str | Path,  # data directory (its prefs.jsonl) or a prefs JSONL file
    out: str | Path,  # run directory for the tuned model
    steps: int | None = None,  # optimizer steps (default: scaled to the data)
    beta: float = DEFAULT_BETA,  # DPO temperature
    resume: bool | str = False,  # continue from the newest checkpoint in out, or from the one named (step_N)
    parallel: Literal["none", "ddp", "fsdp", "hsdp"] = "none",  # data parallelism (run under torchrun)
    on_step=None,
    **overrides,
) -> dict:
    """DPO of the run (or checkpoint) `base`, usually an SFT run, on the pairs in `data`; returns the last record.

    `data`: a directory holding prefs.jsonl, or a JSONL file of {"prompt", "chosen", "rejected"} records.
    `overrides` set TrainConfig fields by name. OUT gets config.json ("stage": "dpo", "beta"), tokenizer.json,
    metrics.jsonl, checkpoints/ and rejects.jsonl when lines were rejected. resume=True continues the newest
    checkpoint in OUT.
    """
    if not beta > 0:
        raise ValueError(f"beta={beta}: expected a positive number")
    out = Path(out)
    base_run, base_ckpt, base_config = tuning.base_settings(base)
    path, pairs, rejects, side = tuning.read_and_split(
        data, "prefs.jsonl", parse_pair, "prompt", "preference pair"
    )

    if steps is not None:
        overrides["steps"] = steps
    dist = distributed.setup(parallel)
    try:
        loaded = load_model(base_ckpt, dist.device)
        tok, mcfg = loaded.tokenizer, loaded.config
        tcfg = tuning.tuned_config(base_config["train"], LR_SCALE, overrides, mcfg)

        encoded, shortened, cut = _encode_pairs(pairs, side, tok, tcfg.seq_len, rejects)
        if not encoded[False] or not encoded[True]:
            raise ValueError(f"{path}: no pair left to train on or to hold out after encoding")
        loader_args = (tcfg.batch_size, tok.pad_id, dist.rank, dist.world_size, dist.device)
        train_loader = PairLoader(encoded[False], *loader_args, shuffle_seed=tcfg.seed)
        val_loader = PairLoader(encoded[True], *loader_args, repeat=False)
        epoch_steps = math.ceil(len(encoded[False]) / (tcfg.batch_size * tcfg.grad_accum * dist.world_size))
        tcfg = tuning.schedule_for(tcfg, overrides.get("steps", epoch_steps), overrides)

        data_stats = {
            "pairs": len(pairs),
            "rejected_lines": len(rejects),
            "train": len(encoded[False]),
            "held_out": len(encoded[True]),
            "prompts_shortened": shortened,
            "replies_cut": cut,
        }
        info = {
            "stage": "dpo",
            "base": str(base_ckpt),
            "data": str(path),
            "beta": beta,
            "reference": "the base checkpoint, frozen; log-probs computed on the fly",
            "data_stats": data_stats,
        }
        start_run(out, resume, mcfg, tcfg, base_run / "tokenizer.json", dist, **info)
        tuning.write_rejects(out, rejects, "preference lines", dist)
        dist.log(
            f"dpo: {len(encoded[False]):,} pairs, {len(encoded[True]):,} held out; {shortened} prompts shortened, "
            f"{cut} replies cut; beta {beta}, {tcfg.steps} steps at lr {tcfg.lr:.2e}"
        )
        torch.manual_seed(tcfg.seed)
        policy = loaded.model.train()
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        record = train(
            policy,
            tcfg,
            train_loader,
            val_loader,
            out,
            dist=dist,
            loss_fn=dpo_loss_fn(reference, beta),
            eval_fn=dpo_eval_fn(reference, beta, dist, tcfg.eval_batches),
            on_step=on_step,
            resume=resume,
            extra_state={"model_config": asdict(mcfg), "stage": "dpo", "beta": beta},
        )
        dist.log(
            f"[green]dpo finished: step {record.get('step')}, held-out pair accuracy "
            f"{record.get('val_pair_accuracy')}, reward margin {record.get('val_reward_margin')}"
        )
        return record
    finally:
        distributed.teardown(dist)
