"""Token shards from real tweets: round trips over rollovers, corrupt files, atomicity, loader resume and ranks."""

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from myna.data.loader import TokenLoader
from myna.data.shards import HEADER_SIZE, MAGIC, ShardWriter, read_shard, shard_info
from myna.tokenizer import train_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "tok" / "tweets.txt"
LINES = FIXTURE.read_text(encoding="utf-8").splitlines()


@functools.cache
def tweet_docs() -> tuple[tuple[int, ...], ...]:
    tok = train_tokenizer(LINES, 1024)
    return tuple(tuple(ids) for ids in tok.encode_batch(LINES))


def write(out_dir: Path, docs, vocab_size: int, shard_tokens: int, prefix: str = "train") -> list[Path]:
    with ShardWriter(out_dir, prefix, vocab_size, shard_tokens=shard_tokens) as w:
        for doc in docs:
            w.add(doc)
    return w.close()


def split_docs(tokens: np.ndarray, bos: int = 0) -> list[list[int]]:
    starts = np.flatnonzero(tokens == bos).tolist() + [len(tokens)]
    return [tokens[a + 1 : b].tolist() for a, b in zip(starts, starts[1:], strict=False)]


def test_round_trip_uint16_over_rollovers(tmp_path: Path):
    docs = tweet_docs()
    paths = write(tmp_path, docs, vocab_size=1024, shard_tokens=2000)
    assert len(paths) > 10
    assert [p.name for p in paths] == [f"train_{i:06d}.bin" for i in range(len(paths))]
    assert sorted(tmp_path.iterdir()) == paths  # nothing else left behind
    got = []
    for p in paths:
        tokens = read_shard(p)
        info = shard_info(p)
        assert tokens.dtype == np.uint16 and info.num_tokens == len(tokens) <= 2000
        assert (info.vocab_size, info.bos_id, info.version) == (1024, 0, 1)
        assert tokens[0] == 0  # every shard starts a document
        got += split_docs(np.asarray(tokens))
    assert got == [list(d) for d in docs]


def test_round_trip_uint32(tmp_path: Path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 70000, size=rng.integers(0, 300)) for _ in range(200)]
    docs[3] = np.array([65535, 65536, 69999])  # ids just past uint16
    paths = write(tmp_path, docs, vocab_size=70000, shard_tokens=5000)
    assert len(paths) > 3
    tokens = np.concatenate([read_shard(p) for p in paths])
    assert tokens.dtype == np.uint32
    assert split_docs(tokens) == [d.tolist() for d in docs]


def test_long_document_gets_its_own_shard(tmp_path: Path):
    paths = write(tmp_path, [[5] * 10, list(range(1, 50)), [7] * 3], vocab_size=300, shard_tokens=20)
    assert [shard_info(p).num_tokens for p in paths] == [11, 50, 4]


@pytest.mark.parametrize("shard_tokens", [7, 64, 2**20])
def test_add_many_writes_the_same_bytes_as_add(tmp_path: Path, shard_tokens: int):
    docs = [list(d) for d in tweet_docs()[:300]] + [[], [5] * 100, [9]]
    one = write(tmp_path / "one", docs, 4096, shard_tokens)
    with ShardWriter(tmp_path / "many", "train", 4096, shard_tokens=shard_tokens) as w:
        for i in range(0, len(docs), 37):  # chunks that do not line up with shard boundaries
            w.add_many(docs[i : i + 37])
    many = sorted((tmp_path / "many").glob("*.bin"))
    assert [p.name for p in many] == [p.name for p in one]
    assert [p.read_bytes() for p in many] == [p.read_bytes() for p in one]


def test_bad_documents_are_rejected(tmp_path: Path):
    with ShardWriter(tmp_path, "t", vocab_size=300) as w:
        w.add([1, 2, 3])
        with pytest.raises(ValueError, match="document 1: token id 300 outside 0..299"):
            w.add([1, 300])
        with pytest.raises(ValueError, match="document 1: token id -1"):
            w.add([-1])
        with pytest.raises(ValueError, match="contains bos"):
            w.add([4, 0, 4])
        with pytest.raises(ValueError, match="integers"):
            w.add([1.5])
    assert split_docs(read_shard(tmp_path / "t_000000.bin")) == [[1, 2, 3]]
    with pytest.raises(ValueError, match="outside 0..65535"):
        ShardWriter(tmp_path / "b", "t", vocab_size=65536).add([65536])


def test_existing_shards_are_not_mixed_with_new_ones(tmp_path: Path):
    write(tmp_path, [[1, 2]], vocab_size=300, shard_tokens=100)
    with pytest.raises(FileExistsError, match="train_"):
        ShardWriter(tmp_path, "train", vocab_size=300)
    ShardWriter(tmp_path, "val", vocab_size=300).close()  # another prefix is fine


def test_corrupt_shards_are_rejected_naming_file(tmp_path: Path):
    (good,) = write(tmp_path / "src", [list(range(1, 100))], vocab_size=300, shard_tokens=1000)
    data = good.read_bytes()

    def corrupt(name: str, content: bytes) -> Path:
        p = tmp_path / name
        p.write_bytes(content)
        return p

    cases = {
        "short.bin": (data[:-2], "short.bin: truncated: header says 100 tokens"),
        "extra.bin": (data + b"\0\0", "extra.bin: trailing bytes"),
        "headless.bin": (data[:100], "headless.bin: truncated shard: 100 bytes"),
        "magic.bin": (b"NOTATOK\0" + data[8:], "magic.bin: not a token shard"),
        "version.bin": (data[:8] + (9).to_bytes(4, "little") + data[12:], "version.bin: shard version 9"),
        "width.bin": (data[:12] + (4).to_bytes(4, "little") + data[16:], "width.bin: inconsistent header"),
    }
    for name, (content, message) in cases.items():
        path = corrupt(name, content)
        with pytest.raises(ValueError, match=message):
            read_shard(path)
    assert data[:8] == MAGIC and len(data) == HEADER_SIZE + 2 * 100


def test_failure_midway_leaves_only_finished_shards(tmp_path: Path):
    docs = tweet_docs()
    with pytest.raises(RuntimeError, match="disk on fire"):
        with ShardWriter(tmp_path, "train", vocab_size=1024, shard_tokens=2000) as w:
            for i, doc in enumerate(docs):
                if i == 300:
                    # Mid-shard: the shard in progress exists only as a hidden temp file.
                    assert sorted(tmp_path.glob("*.bin")) == w.paths[:-1]
                    assert len(os.listdir(tmp_path)) == len(w.paths)
                    raise RuntimeError("disk on fire")
                w.add(doc)
    finished = sorted(tmp_path.iterdir())
    assert len(finished) >= 2 and all(p.suffix == ".bin" for p in finished)
    got = [d for p in finished for d in split_docs(np.asarray(read_shard(p)))]
    assert got == [list(d) for d in docs[: len(got)]] and len(got) < 300


def test_bad_id_midway_removes_partial_shard(tmp_path: Path):
    with pytest.raises(ValueError):
        with ShardWriter(tmp_path, "train", vocab_size=300, shard_tokens=10) as w:
            for _ in range(5):
                w.add([1, 2, 3, 4])
            w.add([999])
    assert [shard_info(p).num_tokens for p in sorted(tmp_path.iterdir())] == [10, 10]


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    write(tmp_path, tweet_docs(), vocab_size=1024, shard_tokens=4000)
    return tmp_path


def take(loader: TokenLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def test_loader_windows_and_shift(shard_dir: Path):
    T = 32
    loader = TokenLoader(shard_dir, batch_size=4, seq_len=T)
    x, y = next(loader)
    assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.int64
    first = np.asarray(read_shard(sorted(shard_dir.glob("*.bin"))[0]))
    for row in range(4):
        assert x[row].tolist() == first[row * T : row * T + T].tolist()
        assert y[row].tolist() == first[row * T + 1 : row * T + T + 1].tolist()


def test_loader_covers_every_window_once_per_epoch(shard_dir: Path):
    T = 64
    paths = sorted(shard_dir.glob("*.bin"))[:3]
    expected = []
    for p in paths:
        tokens = np.asarray(read_shard(p))
        expected += [tokens[k * T : k * T + T + 1].tolist() for k in range((len(tokens) - 1) // T)]
    loader = TokenLoader(paths, batch_size=1, seq_len=T)
    seen = [torch.cat([x[0], y[0, -1:]]).tolist() for x, y in take(loader, len(expected) + 1)]
    assert seen[:-1] == expected
    assert seen[-1] == expected[0] and loader.state_dict()["epoch"] == 1
    # shuffled: each epoch is a different permutation of the same windows
    shuffled = TokenLoader(paths, batch_size=1, seq_len=T, shuffle_seed=7)
    epochs = [
        [torch.cat([x[0], y[0, -1:]]).tolist() for x, y in take(shuffled, len(expected))] for _ in range(2)
    ]
    for epoch in epochs:
        assert sorted(epoch) == sorted(expected) and epoch != expected
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("shuffle_seed", [None, 3])
@pytest.mark.parametrize("shard_tokens", [4000, 200])  # 200: few windows, so 10 batches wrap several epochs
def test_loader_resume_yields_the_same_batches(tmp_path: Path, shard_tokens: int, shuffle_seed: int | None):
    paths = write(tmp_path, tweet_docs(), vocab_size=1024, shard_tokens=shard_tokens)[:2]
    straight = take(TokenLoader(paths, batch_size=4, seq_len=48, shuffle_seed=shuffle_seed), 10)
    first = TokenLoader(paths, batch_size=4, seq_len=48, shuffle_seed=shuffle_seed)
    take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = TokenLoader(paths, batch_size=4, seq_len=48, shuffle_seed=shuffle_seed)
    resumed.load_state_dict(state)
    for (x0, y0), (x1, y1) in zip(straight[5:], take(resumed, 5), strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    if shard_tokens == 200:
        assert resumed.state_dict()["epoch"] >= 2


@pytest.mark.parametrize("shuffle_seed", [None, 5])
def test_ranks_split_the_global_batch(shard_dir: Path, shuffle_seed: int | None):
    single = TokenLoader(shard_dir, batch_size=8, seq_len=40, shuffle_seed=shuffle_seed)
    ranks = [
        TokenLoader(shard_dir, batch_size=4, seq_len=40, rank=r, world_size=2, shuffle_seed=shuffle_seed)
        for r in range(2)
    ]
    for _ in range(3):
        gx, gy = next(single)
        (x0, y0), (x1, y1) = next(ranks[0]), next(ranks[1])
        assert torch.equal(x0, gx[0::2]) and torch.equal(x1, gx[1::2])
        assert torch.equal(y0, gy[0::2]) and torch.equal(y1, gy[1::2])
        assert not torch.equal(x0, x1)
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_loader_rejects_mismatched_state_and_bad_args(shard_dir: Path):
    loader = TokenLoader(shard_dir, batch_size=2, seq_len=16)
    other = TokenLoader(shard_dir, batch_size=2, seq_len=32)
    with pytest.raises(ValueError, match="seq_len=16"):
        other.load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="shuffle_seed"):
        TokenLoader(shard_dir, batch_size=2, seq_len=16, shuffle_seed=1).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="rank=2"):
        TokenLoader(shard_dir, batch_size=2, seq_len=16, rank=2, world_size=2)
    (shard_dir / "empty").mkdir()
    with pytest.raises(ValueError, match="no shards"):
        TokenLoader(shard_dir / "empty", batch_size=2, seq_len=16)
    with pytest.raises(ValueError, match="seq_len \\+ 1"):
        TokenLoader(shard_dir, batch_size=2, seq_len=10**6)


def test_loader_names_a_token_outside_the_vocabulary(tmp_path: Path):
    with ShardWriter(tmp_path, "train", vocab_size=300) as w:
        w.add(list(range(1, 100)))
    shard = next(tmp_path.glob("train_*.bin"))
    data = bytearray(shard.read_bytes())
    data[-4:-2] = (299 + 1000).to_bytes(2, "little")  # a damaged body under an intact header
    shard.write_bytes(bytes(data))
    loader = TokenLoader(tmp_path, batch_size=1, seq_len=99)
    with pytest.raises(
        ValueError, match=rf"{shard.name}: token 1299 at position 98 is outside the vocabulary of 300"
    ):
        next(loader)
