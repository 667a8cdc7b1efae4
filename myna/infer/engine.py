"""The inference engine: continuous batching over one preallocated KV cache, per-request sampling, streaming.

One background thread owns the decoding. Each turn of its loop:
  1. takes new requests and cancellations from the inbox (a cancelled request leaves here, its row freed);
  2. admits waiting requests into free cache rows and prefills them in one padded forward (chunked, so a long
     prompt bounds its activations), sampling each one's first token: running requests wait one step at most;
  3. runs one batched decode forward that advances every active row by one token, each row at its own length;
  4. samples a token per row, each request with its own settings and random generator, streams the text, and
     frees the rows of finished requests, so waiting ones join at the next turn.
Active requests always occupy rows [0, n): a freed row is refilled by moving the last row into it, so every
forward runs on a slice of the cache (never a gather) and attention reads up to the longest active length only.

With use_cache=False every step re-runs the full forward over each whole sequence: the baseline of
bench/infer.py and the reference of the equivalence tests.

Sampling is reproducible per request: a request draws one uniform number per sampled token from its own
generator and inverts the CDF of its own (penalised, tempered, filtered) distribution, so the same seed and prompt
give the same text alone or in any batch.
"""

import asyncio
import codecs
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from myna.model import GPT, KVCache, mean_pool, pad_right
from myna.tokenizer import Tokenizer

PREFILL_TOKENS = 2048  # padded prompt tokens per prefill forward: bounds activations and decode stalls
EMBED_BATCH = 32  # sequences per embedding forward


def set_cpu_threads(device: str | torch.device) -> None:
    """Serve from one torch thread on CPU unless OMP_NUM_THREADS says otherwise (process-wide; call at start-up).

    Decode matmuls this small gain nothing from a second thread, and in the engine's scheduler thread its OpenMP
    team contends with the main thread's (README, Serving).
    """
    if torch.device(device).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


@contextmanager
def cpu_threads(device: str | torch.device):
    """`set_cpu_threads` for a stretch of work (e.g. eval inside a training process), the count restored after."""
    n = torch.get_num_threads()
    set_cpu_threads(device)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off (CTRL-style: divide positive logits, multiply negative ones)
    seed: int | None = None  # per-request generator: same seed + same prompt = same text, batched or not
    stop: tuple[str, ...] = ()  # stop strings (not included in the output text)
    stop_token_ids: tuple[int, ...] = ()  # in addition to the tokenizer's <|end|>, which always stops

    def __post_init__(self) -> None:
        # JSON callers pass lists, or (as OpenAI's API allows) one bare string; keep immutable tuples
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        ids = (self.stop_token_ids,) if isinstance(self.stop_token_ids, int) else tuple(self.stop_token_ids)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", ids)
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (
                all(isinstance(s, str) and s for s in self.stop),
                f"stop strings must be non-empty: {self.stop}",
            ),
            (self.seed is None or 0 <= self.seed < 2**64, f"seed must be in [0, 2**64), got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class Completion:
    text: str  # without the stop string and without the stop token's text
    token_ids: list[int]  # every generated token, including the stop token that ended generation
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int  # len(token_ids)
    ttft_s: float  # submit -> first token
    total_s: float


class Request:
    """The handle of one generation. Any number of readers may stream it; each sees every delta."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, engine: "Engine"):
        self.id = uuid.uuid4().hex
        self.prompt_ids = prompt_ids
        self.params = params
        self.submitted = time.perf_counter()
        self._engine = engine
        self._cond = threading.Condition()  # wakes streaming readers at every delta
        self._finished = threading.Event()  # wakes result() once, at the end
        self._deltas: list[str] = []
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.cancelled = False  # set by cancel(), read by the scheduler

    @property
    def done(self) -> bool:
        return self._completion is not None or self._error is not None

    def __iter__(self) -> Iterator[str]:
        """Text deltas as they come (blocking); raises the scheduler's error if generation failed."""
        sent = 0
        while True:
            with self._cond:
                while sent == len(self._deltas) and not self.done:
                    self._cond.wait()
                new, finished = self._deltas[sent:], self.done
            sent += len(new)
            yield from new
            if finished and sent == len(self._deltas):
                self._raise_if_failed()
                return

    async def astream(self) -> AsyncIterator[str]:
        """The same deltas without blocking the event loop; cancelling the consuming task cancels the request."""
        loop = asyncio.get_running_loop()
        sent = 0
        try:
            while True:
                ready = asyncio.Event()
                with self._cond:
                    new, finished = self._deltas[sent:], self.done
                    if not new and not finished:
                        self._waiters.append((loop, ready))
                for delta in new:
                    sent += 1
                    yield delta
                if finished and sent == len(self._deltas):
                    break
                if not new:
                    await ready.wait()
        except asyncio.CancelledError:
            self.cancel()
            raise
        self._raise_if_failed()

    def cancel(self) -> None:
        """Stop generating at the next step (finish_reason "cancelled"); the row is freed for others."""
        self.cancelled = True
        self._engine._wake()

    def result(self, timeout: float | None = None) -> Completion:
        """Block until finished; raises the scheduler's error if generation failed."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        self._raise_if_failed()
        return self._completion

    async def aresult(self) -> Completion:
        async for _ in self.astream():
            pass
        return self.result()

    # --- called by the scheduler thread ---

    def _publish(
        self, delta: str = "", completion: Completion | None = None, error: BaseException | None = None
    ):
        with self._cond:
            if delta:
                self._deltas.append(delta)
            self._completion = self._completion or completion
            self._error = self._error or error
            waiters, self._waiters = self._waiters, []
            self._cond.notify_all()
        if self.done:
            self._finished.set()
        for loop, ready in waiters:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # that event loop has closed: nobody is listening there any more
                pass

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


class TextStream:
    """Token ids -> text deltas of one generation.

    UTF-8 bytes are decoded incrementally, so a character whose bytes span several tokens comes out whole once
    its last byte arrives. Text that could be the beginning of a stop string is held back until it cannot; a stop
    string that appears ends the text just before it.
    """

    def __init__(self, token_bytes: list[bytes], stop: tuple[str, ...] = ()):
        self.token_bytes = token_bytes
        self.stop = stop
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far (cut at a stop string once one appears)
        self.sent = 0  # characters of text already handed out
        self.stopped = False  # a stop string appeared

    def push(self, token_id: int) -> str:
        """Decode one token; return the text that is now safe to emit ('' while held back)."""
        self.text += self.utf8.decode(self.token_bytes[token_id])
        return self._emit(final=False)

    def flush(self) -> str:
        """End of generation: the held-back text, and an unfinished trailing character as U+FFFD."""
        self.text += self.utf8.decode(b"", final=True)
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        # held-back text never holds a whole stop string, so a new match cannot start before `sent`
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
        safe = len(self.text) if final or self.stopped else len(self.text) - self._partial_stop()
        delta, self.sent = self.text[self.sent : safe], safe
        return delta

    def _partial_stop(self) -> int:
        """Length of the longest unsent suffix of the text that is a proper prefix of a stop string."""
        tail = self.text[self.sent :]
        for n in range(min(len(tail), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stop):
                return n
        return 0


@dataclass
class SamplingBatch:
    """Per-row sampling settings as tensors, plus host-side facts that let `sample` skip work no row needs."""

    temperature: torch.Tensor  # [B] float, 0 = greedy
    top_k: torch.Tensor  # [B] long, the vocabulary size when off
    top_p: torch.Tensor  # [B] float, 1 when off
    penalty: torch.Tensor  # [B] float
    uniform: torch.Tensor  # [B] float in [0, 1): each row's draw from its own generator
    all_greedy: bool
    max_top_k: int  # the largest top-k in use, 0 if none
    any_top_p: bool
    any_penalty: bool

    @classmethod
    def build(cls, params: list[SamplingParams], uniform: list[float], vocab: int, device) -> "SamplingBatch":
        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        # filters of greedy rows are moot: switch them off so they cost nothing
        top_k = [p.top_k if p.temperature > 0 and 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p if p.temperature > 0 else 1.0 for p in params]
        return cls(
            temperature=tensor([p.temperature for p in params], torch.float32),
            top_k=tensor(top_k, torch.long),
            top_p=tensor(top_p, torch.float32),
            penalty=tensor([p.repetition_penalty for p in params], torch.float32),
            uniform=tensor(uniform, torch.float32),
            all_greedy=all(p.temperature == 0 for p in params),
            max_top_k=max((k for k in top_k if k < vocab), default=0),
            any_top_p=any(p < 1 for p in top_p),
            any_penalty=any(p.repetition_penalty != 1 for p in params),
        )


def sample(logits: torch.Tensor, batch: SamplingBatch, seen: torch.Tensor) -> torch.Tensor:
    """One token id per row of logits [B, V] (fp32); seen [B, V] marks the tokens each row's sequence holds.

    Order as in HF/CTRL: repetition penalty, then greedy argmax or temperature -> top-k -> top-p -> draw. Every
    operation is row-wise, and a setting that is off is an exact no-op, so a row samples the same token whatever
    other rows share its batch.
    """
    if batch.any_penalty:
        p = batch.penalty[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    greedy = logits.argmax(-1)
    if batch.all_greedy:
        return greedy
    t = batch.temperature[:, None]
    logits = logits / torch.where(t > 0, t, torch.ones_like(t))
    if batch.max_top_k or batch.any_top_p:
        logits = _top_k_top_p(logits, batch)
    cdf = logits.softmax(-1).cumsum(-1)
    # inverse CDF in vocabulary order: the first token whose cumulative probability reaches u
    drawn = torch.searchsorted(cdf, batch.uniform[:, None] * cdf[:, -1:]).squeeze(-1)
    return torch.where(batch.temperature > 0, drawn.clamp_max(logits.size(-1) - 1), greedy)


def _top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Mask (to -inf) every logit below its row's cut: the k-th largest, then the smallest set of mass >= top_p.

    A full sort of the vocabulary is slow on CPU, yet top-p rarely
    reaches far down a trained model's ranking: rank only the n best candidates (topk), and double n while a
    row's nucleus may extend past them. Probabilities stay those of the whole (top-k) distribution.
    """
    V = logits.size(-1)
    k, p = batch.top_k[:, None], batch.top_p[:, None]
    n = min(V, max(batch.max_top_k, 64 if batch.any_top_p else 1))
    whole = logits.logsumexp(-1, keepdim=True) if batch.any_top_p else None  # rows without top-k
    while True:
        ranked = logits.topk(n, -1).values  # descending
        rank = torch.arange(n, device=logits.device)
        ranked = ranked.masked_fill(rank >= k, float("-inf"))
        keep = rank < k
        if batch.any_top_p:
            # n >= every top-k in use, so a row with top-k has its whole renormalising set among the candidates
            probs = (ranked - torch.where(k < V, ranked.logsumexp(-1, keepdim=True), whole)).exp()
            # keep a token while the mass before it is below top_p; top_p = 1 keeps all (rounding must not cut)
            keep &= ((probs.cumsum(-1) - probs) < p) | (p >= 1)
        unbounded = keep[:, -1:] & (k > n)  # keeps every candidate, and maybe tokens beyond them
        if n < V and bool((unbounded & (p < 1)).any()):
            n = min(V, 2 * n)
            continue
        cut = ranked.gather(-1, keep.sum(-1, keepdim=True) - 1)
        cut = cut.masked_fill(unbounded, float("-inf"))  # rows with no filter at all
        return logits.masked_fill(logits < cut, float("-inf"))


@dataclass
class _Sequence:
    """A request the scheduler is running: its tokens, decoder, generator and stop conditions."""

    request: Request
    ids: list[int]  # prompt + generated; the last one is not in the cache yet
    max_new: int
    stop_ids: frozenset[int]
    stream: TextStream
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    ttft_s: float = 0.0


def embed_ids(
    model: GPT, ids_batch: list[list[int]], pad_id: int, batch_size: int = EMBED_BATCH
) -> torch.Tensor:
    """[N, n_embd] fp32 on the CPU: each sequence's final hidden states, mean-pooled and L2-normalised.

    Sequences are right-padded; attention is causal, so real tokens never see the padding, and the padding is
    left out of the mean: a sequence embeds the same alone or beside longer ones. That is why batches may be
    formed by length (less padding to compute) and put back in order after.
    """
    for n, ids in enumerate(ids_batch):
        if not 0 < len(ids) <= model.cfg.max_seq_len:
            raise ValueError(f"ids_batch[{n}]: {len(ids)} tokens; expected 1..{model.cfg.max_seq_len}")
    order = sorted(range(len(ids_batch)), key=lambda i: len(ids_batch[i]))
    out = torch.zeros(len(ids_batch), model.cfg.n_embd)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            idx, lengths = pad_right([ids_batch[i] for i in rows], pad_id)
            mean = mean_pool(model.hidden(idx.to(device)).float(), lengths)
            out[rows] = torch.nn.functional.normalize(mean, dim=-1).cpu()
    return out


class Engine:
    """Serves generation requests from one background thread; see the module docstring for the loop."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 8,
        max_len: int | None = None,
        use_cache: bool = True,
        compile: bool = False,
    ):
        cfg = model.cfg
        self.max_len = cfg.max_seq_len if max_len is None else max_len
        if not 2 <= self.max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len={self.max_len}: must be in [2, max_seq_len={cfg.max_seq_len}]")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.use_cache = max_batch, use_cache
        # compile=True: decode steps run GPT.decode through torch.compile (inductor), which fuses the small
        # operations around the matmuls. Dynamic shapes: one graph for every batch size and cache length (a batch
        # of 1 gets its own), compiled at the first decode step of each. Freezing makes the weights constants
        # that inductor prepacks, so the compiled engine keeps the weights it first decoded with.
        if compile and not use_cache:
            raise ValueError("compile=True compiles the cached decode step: it needs use_cache=True")
        # (freezing passed in torch.compile's options= measured no faster: the config is patched around each call)
        self._compiled = torch.compile(model.decode, dynamic=True) if compile else None
        if compile:
            import torch._inductor.config as inductor_config

            self._freezing = lambda: inductor_config.patch(freezing=True)
        param = next(model.parameters())
        self.device = param.device
        # bf16 autocast on CUDA; CPU runs in the model's dtype (bf16 matmuls are slow on most CPUs)
        self.autocast = self.device.type == "cuda" and param.dtype == torch.float32
        cache_dtype = torch.bfloat16 if self.autocast else param.dtype  # the dtype attention computes in
        # a padded model vocabulary may exceed the tokenizer's: never sample an id that has no text
        self.vocab = tokenizer.vocab_size
        # special tokens other than the stop ones read as their names, as in Tokenizer.decode
        specials = {i: name.encode() for name, i in tokenizer.special_ids.items()}
        self.token_bytes = [specials.get(i, b) for i, b in enumerate(tokenizer.token_bytes)]

        with torch.inference_mode():
            self.cache = (
                KVCache(cfg, max_batch, self.max_len, self.device, cache_dtype) if use_cache else None
            )
            self.seen = torch.zeros(max_batch, self.vocab, dtype=torch.bool, device=self.device)
        self.active: list[_Sequence] = []  # row i of the cache holds active[i]
        self.waiting: deque[_Sequence] = deque()

        self._cond = threading.Condition()  # guards the inbox and the lifecycle flags
        self._inbox: list[_Sequence] = []
        self._thread: threading.Thread | None = None
        self._closing = False
        self._crashed: BaseException | None = None

    # --- public API ---

    def start(self) -> "Engine":
        """Start the background scheduler (submit also starts it); returns self."""
        with self._cond:
            if self._closing:
                raise RuntimeError("engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="myna-engine", daemon=True)
                self._thread.start()
        return self

    def close(self) -> None:
        """Stop the scheduler; requests still running or waiting finish as "cancelled"."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        else:  # never started: answer whatever was submitted
            self._cancel_all()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, prompt_ids: list[int], params: SamplingParams = SamplingParams()) -> Request:
        """Queue a generation (thread-safe); the returned Request streams and finishes it."""
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise ValueError("prompt_ids is empty: a prompt needs at least one token (e.g. <|bos|>)")
        if len(ids) > self.max_len - 1:
            raise ValueError(
                f"prompt of {len(ids)} tokens leaves no room to generate in max_len={self.max_len} "
                f"(at most {self.max_len - 1}); shorten it, e.g. template.render_prompt with a budget"
            )
        bad = [i for i in ids if not 0 <= i < self.vocab]
        if bad:
            raise ValueError(f"prompt_ids hold ids outside the vocabulary [0, {self.vocab}): {bad[:5]}")
        request = Request(ids, params, self)
        seq = self._sequence(request)
        self.start()
        with self._cond:
            if self._crashed is not None:
                raise RuntimeError(f"engine scheduler died: {self._crashed!r}") from self._crashed
            if self._closing:
                raise RuntimeError("engine is closed")
            self._inbox.append(seq)
            self._cond.notify_all()
        return request

    def generate(self, prompt_ids: list[int], params: SamplingParams = SamplingParams()) -> Completion:
        return self.submit(prompt_ids, params).result()

    def embed(self, ids_batch: list[list[int]]) -> torch.Tensor:
        """[N, n_embd] fp32 on the CPU: see embed_ids."""
        with self._autocast():
            return embed_ids(self.model, ids_batch, self.tokenizer.pad_id)

    # --- the scheduler thread ---

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()

    def _run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # a new thread starts on cuda:0
        try:
            with torch.inference_mode(), self._autocast():
                while True:
                    with self._cond:
                        while not (self._closing or self._inbox or self.active or self.waiting):
                            self._cond.wait()
                        if self._closing:
                            break
                        self.waiting.extend(self._inbox)
                        self._inbox.clear()
                    try:
                        self._step()
                    except Exception as e:  # a bug outside the guarded forwards: fail who is running
                        self._fail(self.active, e)
                        self.active.clear()
        except BaseException as e:
            with self._cond:
                self._crashed = e
                pending = [*self.active, *self.waiting, *self._inbox]
            self._fail(pending, e)
            raise
        finally:
            self._cancel_all()

    def _step(self) -> None:
        cancelled = [i for i, s in enumerate(self.active) if s.request.cancelled]
        for i in cancelled:
            self._finish(self.active[i], "cancelled")
        self._release(cancelled)
        for s in [s for s in self.waiting if s.request.cancelled]:
            self.waiting.remove(s)
            self._finish(s, "cancelled")

        admitted = self._admit()
        if admitted:
            try:
                logits = self._prefill(admitted)
            except Exception as e:  # e.g. out of memory on a long prompt: fail those, keep the others going
                self._fail(admitted, e)
                return
            self.active.extend(admitted)
            self._sample_and_emit(logits, first_row=len(self.active) - len(admitted))
        if self.active:
            try:
                logits = self._decode()
            except Exception as e:
                self._fail(self.active, e)
                self.active.clear()
                return
            self._sample_and_emit(logits, first_row=0)

    def _admit(self) -> list[_Sequence]:
        """Waiting requests (oldest first) for the free rows, within the prefill budget (always at least one)."""
        admitted: list[_Sequence] = []
        longest = 0
        while self.waiting and len(self.active) + len(admitted) < self.max_batch:
            n = len(self.waiting[0].ids)
            if admitted and (len(admitted) + 1) * max(longest, n) > PREFILL_TOKENS:
                break
            longest = max(longest, n)
            admitted.append(self.waiting.popleft())
        return admitted

    def _sequence(self, request: Request) -> _Sequence:
        p = request.params
        generator = None
        if p.temperature > 0:
            generator = torch.Generator()
            if p.seed is None:
                generator.seed()  # fresh entropy
            else:
                generator.manual_seed(p.seed)
        return _Sequence(
            request=request,
            ids=list(request.prompt_ids),
            max_new=min(p.max_tokens, self.max_len - len(request.prompt_ids)),
            stop_ids=frozenset((self.tokenizer.eot_id, *p.stop_token_ids)),
            stream=TextStream(self.token_bytes, p.stop),
            generator=generator,
        )

    def _pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        """Right-padded ids [B, T] on the model's device, and the lengths."""
        idx, lengths = pad_right(sequences, self.tokenizer.pad_id)
        return idx.to(self.device), lengths.tolist()

    def _prefill(self, seqs: list[_Sequence]) -> torch.Tensor:
        """Feed the new sequences' prompts; their rows are the next free ones. Returns next-token logits [k, V]."""
        first = len(self.active)
        self.seen[first : first + len(seqs)] = False
        for row, s in enumerate(seqs, start=first):
            if s.request.params.repetition_penalty != 1:  # the only reader of seen
                self.seen[row, torch.tensor(s.ids, device=self.device)] = True
        if not self.use_cache:
            return self._full_forward(seqs)
        idx, lengths = self._pad([s.ids for s in seqs])
        view = self.cache.rows(first, first + len(seqs))
        view.reset()
        chunk = max(1, PREFILL_TOKENS // len(seqs))
        last = torch.empty(len(seqs), self.vocab, device=self.device)
        for c in range(0, idx.size(1), chunk):
            width = min(chunk, idx.size(1) - c)
            # each row's last prompt position inside this chunk (clamped); only rows that end here are kept
            at = (torch.tensor(lengths, device=self.device) - 1 - c).clamp(0, width - 1)
            logits = self.model(idx[:, c : c + width], kv_cache=view, logits_at=at)
            rows = [r for r, n in enumerate(lengths) if c < n <= c + width]
            if rows:
                rows_t = torch.tensor(rows, device=self.device)
                last[rows_t] = logits[rows_t, 0, : self.vocab].float()
        view.lengths.copy_(
            torch.tensor(lengths)
        )  # padded rows wrote past their end: those slots count as free
        return last

    def _decode(self) -> torch.Tensor:
        """One forward that advances every active row by its pending token. Returns logits [n, V]."""
        if not self.use_cache:
            return self._full_forward(self.active)
        idx = torch.tensor([[s.ids[-1]] for s in self.active], device=self.device)
        view = self.cache.rows(0, len(self.active))
        if self._compiled is None:
            logits = self.model(idx, kv_cache=view)
        else:
            pos, mask = view.begin(1, self.device)
            if mask is None:  # rows of equal length: every cached key, through a mask all the same
                mask = torch.ones(
                    idx.size(0), 1, 1, int(view.lengths[0]) + 1, dtype=torch.bool, device=self.device
                )
            with self._freezing():
                logits = self._compiled(idx, pos, mask, view.k, view.v)
            view.advance(1)
        return logits[:, -1, : self.vocab].float()

    def _full_forward(self, seqs: list[_Sequence]) -> torch.Tensor:
        """The uncached step: the whole of every sequence, right-padded (causal, so padding is never seen)."""
        idx, lengths = self._pad([s.ids for s in seqs])
        at = torch.tensor(lengths, device=self.device) - 1
        return self.model(idx, logits_at=at)[:, 0, : self.vocab].float()

    def _sample_and_emit(self, logits: torch.Tensor, first_row: int) -> None:
        """Sample a token for rows [first_row, first_row + len(logits)), stream it, free finished rows."""
        seqs = self.active[first_row : first_row + logits.size(0)]
        params = [s.request.params for s in seqs]
        if all(p.temperature == 0 and p.repetition_penalty == 1 for p in params):
            # greedy without penalties: the token sample() would give, without building its batch; seen is read
            # by penalties only, and a request keeps its settings (a new one resets its row in _prefill)
            tokens = logits.argmax(-1)
        else:
            uniform = [
                float(torch.rand((), generator=s.generator)) if s.generator is not None else 0.0 for s in seqs
            ]
            batch = SamplingBatch.build(params, uniform, self.vocab, self.device)
            rows = slice(first_row, first_row + len(seqs))
            tokens = sample(logits, batch, self.seen[rows])
            self.seen[rows].scatter_(1, tokens[:, None], True)
        now = time.perf_counter()
        finished = []
        for row, (s, token) in enumerate(zip(seqs, tokens.tolist(), strict=True), start=first_row):
            if not s.generated:
                s.ttft_s = now - s.request.submitted
            s.ids.append(token)
            s.generated.append(token)
            if token in s.stop_ids:
                reason = "stop"
            else:
                delta = s.stream.push(token)
                s.request._publish(delta)
                reason = "stop" if s.stream.stopped else "length" if len(s.generated) >= s.max_new else None
            if reason:
                self._finish(s, reason)
                finished.append(row)
        self._release(finished)

    def _release(self, rows: list[int]) -> None:
        """Free rows of active sequences, moving the last active row into each hole so rows stay [0, n)."""
        for row in sorted(rows, reverse=True):
            last = len(self.active) - 1
            if row != last:
                if self.cache is not None:
                    self.cache.copy_row(last, row)
                self.seen[row] = self.seen[last]
                self.active[row] = self.active[last]
            self.active.pop()

    def _finish(self, s: _Sequence, reason: str) -> None:
        tail = s.stream.flush()
        request = s.request
        completion = Completion(
            text=s.stream.text,
            token_ids=list(s.generated),
            finish_reason=reason,
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=len(s.generated),
            ttft_s=s.ttft_s if s.generated else 0.0,
            total_s=time.perf_counter() - request.submitted,
        )
        request._publish(tail, completion=completion)

    def _fail(self, seqs: list[_Sequence], error: BaseException) -> None:
        for s in seqs:
            s.request._publish(error=error)

    def _cancel_all(self) -> None:
        """On close: whatever is still running, waiting or in the inbox finishes as "cancelled"."""
        with self._cond:
            pending = [*self.active, *self.waiting, *self._inbox]
            self.active.clear()
            self.waiting.clear()
            self._inbox.clear()
        for s in pending:
            if not s.request.done:
                self._finish(s, "cancelled")
