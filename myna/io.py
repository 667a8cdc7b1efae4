"""File helpers shared by every stage: transparent decompression, atomic writes and their leftovers."""

import contextlib
import gzip
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import zstandard

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def open_binary(path: str | Path) -> io.BufferedIOBase:
    """Open a file for streaming reads, decompressing gzip or zstd by their magic bytes."""
    f = open(path, "rb")
    head = f.peek(4)[:4] if hasattr(f, "peek") else b""
    if head.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=f)  # type: ignore[return-value]
    if head.startswith(ZSTD_MAGIC):
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f, closefd=True))
    return f


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside `path` for writers that want a filename (pyarrow, tokenizers); renamed on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[io.IOBase]:
    """Write to a temp file beside `path`, fsync, then rename: readers see the old file or the new one."""
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        yield f


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temp folder beside `path` to fill; on success it replaces `path` whole (the old one is removed after)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():  # a subfolder's files were synced by whoever wrote them
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove what a killed atomic_write, atomic_path or atomic_dir of `path` left beside it, and return it.

    Only their own names match: `.NAME.` + tempfile's 8 random characters + `.tmp`, and atomic_dir's
    `.NAME.old-PID`. Call it only where no other process is writing `path`.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    leftover = re.compile(rf"\.{re.escape(path.name)}\.(?:[a-z0-9_]{{8}}\.tmp|old-[0-9]+)")
    removed = [p for p in path.parent.iterdir() if leftover.fullmatch(p.name)]
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return removed


def read_json(path: str | Path, max_bytes: int = 1 << 20) -> dict:
    """A JSON object from a file a user handed over: bounded in size, and every failure names the file."""
    path = Path(path)
    try:
        if path.stat().st_size > max_bytes:
            raise ValueError(f"{path}: over {max_bytes:,} bytes; not a file Myna wrote")
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is damaged") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
