"""The settings of `myna classify` and `myna eval`, free of torch: the command line reads its flags from here."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

TWEETEVAL_DIR = Path(__file__).resolve().parents[2] / "data" / "tweeteval"  # the bundled copy


@dataclass
class ClassifySettings:
    mode: Literal["finetune", "probe"] = "finetune"  # finetune the body with a head, or a linear probe on it
    pooling: str = "mean"  # "mean" | "last"
    epochs: int = 5  # finetune: epochs at most; early stopping on val usually ends sooner
    patience: int = 2  # validation checks without improvement before stopping
    evals_per_epoch: int = 2
    lr_body: float = 3e-4  # finetune: peak learning rate of the pre-trained body (slower than the fresh head)
    lr_head: float = 3e-3  # finetune: peak learning rate of the fresh head
    probe_lr: float = 1e-2
    probe_epochs: int = 300  # full-batch steps of the probe's logistic regression
    weight_decay: float = 0.01
    class_weight: bool = True  # inverse-frequency loss weights: the macro metrics reward the rare classes
    # finetune: weight of an auxiliary next-token loss on the training texts: keeps the body a language model of
    # the task's text while it learns the labels (it raised the val metrics: README, TweetEval)
    lm_weight: float = 0.5
    max_len: int = 128  # tokens per text, bos included
    batch_tokens: int = 1024  # padded token slots per training batch
    seed: int = 0


@dataclass
class EvalConfig:
    """What `myna eval RUN` measures, and how: everything but the run and where eval.json goes."""

    tweeteval: str | Path = TWEETEVAL_DIR  # TweetEval data folder
    # classifier: fine-tuned classifiers; lm: label words scored by LM likelihood; both; none: skip TweetEval
    tweeteval_mode: Literal["classifier", "lm", "both", "none"] = "classifier"
    train_cap: int | None = None  # first N train rows per task (default: all)
    test_cap: int | None = None  # first N test rows per task (not comparable to the published rows)
    settings: ClassifySettings = field(default_factory=ClassifySettings)  # the classifiers'
    shots: int = 0  # lm mode: examples in the prompt
    tasks: tuple[str, ...] | None = None  # TweetEval tasks, comma-separated (default: all seven)
    seeds: int = 1  # classifiers per task from consecutive seeds (see seed_choice)
    # with seeds > 1: average the classifiers' probabilities, or keep the one val scores highest (restarts)
    seed_choice: Literal["average", "best"] = "average"
    chat_prompts: int = 200  # held-out prompts of the chat format check
    chat_max_tokens: int = 64  # the format check's greedy replies end with <|end|> within this many tokens
    val_tokens: int = 2**20  # at most this many val tokens (the bundled sample's whole val split is fewer)
    device: str = "cpu"  # cpu, cuda, cuda:1 ...
