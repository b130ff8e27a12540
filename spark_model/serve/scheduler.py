"""The batching scheduler: one engine thread shares the compiled decode loop among clients.

Requests wait in a bounded queue (full means `Busy`, answered at once, never a hang). The
engine thread loops: admit waiting requests into free slots (prefilled in groups, each
request's first token delivered at once), then decode a few steps for the busy slots, hand
each request its new text, and retire the finished ones. Cancelled requests and requests whose
client has gone are dropped at the next step boundary, which frees their slot.

Steps per decode call trade admission latency against per-call overhead: a call never runs
past the point where the first busy slot spends its token budget (so a waiting request
gets that slot at once), and while a slot is free, calls are kept to about
`call_budget_s`, since a newcomer would wait for the call in flight. Right after a request
ends its client often sends the next one within a millisecond or two (a chat turn, an
agent's next call, a benchmark loop), so while a slot freed less than `refill_window_s`
ago is still empty, calls shrink to about `refill_budget_s` (one step at full width): the
expected newcomer waits for one short call, not a long one.

Results go back through each job's `sink`, a callable the engine thread invokes with
plain dict events; the asyncio side wraps it with `loop.call_soon_threadsafe`. Events are
held in an outbox and handed over just before the engine thread next blocks (on the
device, or idle): by then the next device call is already running, so the event loop
formats and sends frames while the device computes instead of contending for the GIL
with the engine thread between two calls.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from spark_model import generation
from spark_model.api import SparkModel
from spark_model import speculative
from spark_model.serve import draft_slots, prefix_cache
from spark_model.serve import slots as slots_mod
from spark_model.serve import spec_slots

log = logging.getLogger("spark.serve")

STEP_CHOICES = (1, 2, 4, 8)  # decode steps per call: a few compiled variants
# Shortest prompt bucket. Prefill is compute-bound on CPU and short chat and completion
# prompts are mostly under 8 tokens, so a bucket of 8 halves their prefill against 16.
PROMPT_MIN = 8
# A group whose prompts total at most this many tokens is prefilled packed into one
# sequence (its cost follows the tokens it has); larger groups use the batched prefill.
PACK_MAX = 256


class Busy(Exception):
    """The request queue is full."""


def check_speculative(method: str | None, draft_tokens) -> int | None:
    """The draft length a server speculating with `method` uses (None: no speculation);
    SpeculationError for an unknown method or draft_tokens outside 1..MAX_DRAFT."""
    if method is None:
        return None
    if method not in METHODS:
        raise speculative.SpeculationError(
            f"unknown speculative method {method!r}; choose from {', '.join(METHODS)}")
    return speculative.check_draft_tokens(draft_tokens)


# How a server may speculate: drafts copied from each request's own context
# (`spec_slots`), or proposed by a draft model (`draft_slots`).
METHODS = (*spec_slots.METHODS, "draft_model")


@dataclasses.dataclass(eq=False)
class Job:
    """One generation request as the engine sees it (validated before it gets here)."""

    ids: list[int]  # prompt token ids, BOS first
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    fim: bool = False  # an infill: its infill end tokens end it too
    speculative: bool | None = None  # draft if the server speculates (None: it decides)
    cached: int = 0  # prompt tokens whose keys and values came from the prefix cache
    sink: Callable[[dict], None] = lambda event: None
    # Filled in by the engine:
    cancelled: bool = False
    t_submit: float = 0.0
    t_first: float | None = None
    count: int = 0
    last_token: int = -1
    drafting: bool = False  # its slot drafts (the server speculates, the request allows)
    drafted: int = 0  # draft tokens proposed for it, and how many of them it emitted
    accepted: int = 0

    def cancel(self) -> None:
        """Stop this request at the next step boundary (thread-safe: one flag)."""
        self.cancelled = True


class _Live:
    """Host-side text state of a job in a slot: incremental decoding and stop cutting."""

    def __init__(self, job: Job, model: SparkModel):
        self.job = job
        self.decoder = model.tokenizer.stream_decoder()
        self.cutter = generation.StopCutter(job.stop)
        self.end_ids = () if job.ignore_eos else \
            model.fim_end_ids() if job.fim else model.end_ids

    def feed(self, tokens: list[int]) -> str:
        """Take new tokens; return the text that may be shown now (an end id that ends
        the request counts as a token but shows no text)."""
        job = self.job
        job.count += len(tokens)
        job.last_token = tokens[-1] if tokens else job.last_token
        text = self.cutter.push(self.decoder.feed(
            [t for t in tokens if t not in self.end_ids]))
        if text and job.t_first is None:
            job.t_first = time.perf_counter()
        return text


class Engine:
    """B slots over one batched KV cache, driven by one thread."""

    def __init__(self, model: SparkModel, *, max_batch: int = 8, max_queue: int = 64,
                 call_budget_s: float = 0.008, refill_budget_s: float = 0.002,
                 refill_window_s: float = 0.010, prefix_cache_bytes: int = 0,
                 speculative_method: str | None = None, draft_tokens: int = 7,
                 draft_model: SparkModel | None = None):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        if (draft_model is not None) != (speculative_method == "draft_model"):
            raise speculative.SpeculationError(
                "speculative method 'draft_model' and a draft model go together")
        if draft_model is not None:
            model.check_draft(draft_model)  # the same vocabulary, room for the capacity
        # Requests draft draft_tokens tokens per step from their own context (`spec_slots`)
        # or from the draft model (`draft_slots`); None: every request decodes plainly.
        self.draft_tokens = check_speculative(speculative_method, draft_tokens)
        self.speculative_method = speculative_method
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.call_budget_s = call_budget_s
        self.refill_budget_s = refill_budget_s
        self.refill_window_s = refill_window_s
        self._freed_at = [-math.inf] * max_batch  # when each slot last became free
        self.widths = sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)})
        self._slots = slots_mod.init_slots(model.config, max_batch, model.capacity,
                                           model.token_table, model.end_id_vector())
        # Keys and values of recent prompts, by blocks of tokens (0 bytes: none).
        self._prefix = None if not prefix_cache_bytes else prefix_cache.PrefixCache(
            model.config, prefix_cache_bytes, self._slots.state.cache.length, max_batch)
        self._reused: dict[int, list[prefix_cache.Block]] = {}  # slot -> blocks it reused
        self._spec = None if self.draft_tokens is None else \
            spec_slots.init_spec(max_batch, self._slots.state.tokens_bn.shape[1])
        self.draft_model = draft_model
        self._draft = None if draft_model is None else \
            draft_slots.init_draft(draft_model, max_batch, model.capacity)
        self._spec_step_s = {w: 0.002 * (1 + w / 4) for w in self.widths}  # per iteration
        self.drafted = self.accepted = 0  # totals since start
        self._live: list[_Live | None] = [None] * max_batch
        self._pending: collections.deque[Job] = collections.deque()
        self._outbox: list[tuple[Job, dict]] = []  # events not yet handed to their sinks
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._step_s = {w: 0.001 * (1 + w / 4) for w in self.widths}  # refined as it runs
        self.finished: collections.Counter[str] = collections.Counter()  # by reason
        # Where the engine thread's time goes (seconds, and counts), for /health: enough
        # to tell waiting for work from prefill, device steps and the host's share.
        self.timing: collections.Counter[str] = collections.Counter()

    # ---- called from any thread ------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="spark-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, job: Job) -> None:
        """Queue a job, or raise Busy when max_queue jobs are already waiting."""
        with self._cv:
            if self._closing:
                raise Busy("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise Busy(f"{len(self._pending)} requests are already waiting for one of "
                           f"{self.max_batch} slots; retry shortly")
            job.t_submit = time.perf_counter()
            self._pending.append(job)
            self._cv.notify()

    def stats(self) -> dict:
        return {"active": sum(x is not None for x in self._live),
                "queued": len(self._pending), "max_batch": self.max_batch,
                "max_queue": self.max_queue, "finished": dict(self.finished),
                "timing": {k: round(v, 6) for k, v in self.timing.items()},
                "prefix_cache": self._prefix.stats() if self._prefix else {"enabled": False},
                "speculative": self.spec_stats()}

    def spec_stats(self) -> dict:
        """Speculation's totals since start: draft tokens proposed and accepted."""
        if self.draft_tokens is None:
            return {"enabled": False}
        return {"enabled": True, "method": self.speculative_method,
                "draft_tokens": self.draft_tokens, "drafted_tokens": self.drafted,
                "accepted_tokens": self.accepted,
                "acceptance_rate": round(self.accepted / self.drafted, 6) if self.drafted
                else None}

    def warmup(self, prompt_buckets=(PROMPT_MIN,)) -> None:
        """Compile the programs a short request needs (before the thread starts), and with
        a prefix cache those that reuse it for one request with a short rest."""
        m = self.model
        prefix, self._prefix = self._prefix, None  # warm-up prompts are not cached
        try:
            for p in prompt_buckets:
                n = min(p, m.capacity - 1)
                start = m.tokenizer.encode("", bos=True)  # [BOS], or nothing without one
                ids = start + [m.tokenizer.pad_id] * (n - len(start))
                for w in self.widths:
                    self._admit([(i, Job(ids=ids, max_tokens=1)) for i in range(w)])
        finally:
            self._prefix = prefix
        if prefix is not None:
            for p in (8, 16, 32, 64):  # a reuse leaves under one block plus what is new
                if p < m.capacity:
                    self._admit_group([(0, Job(ids=[m.tokenizer.pad_id] * p, max_tokens=1))],
                                      cached=True)
            prefix.pool = prefix_cache.save_jit(prefix.pool, self._slots.state.cache,
                                                *jax.tree.leaves(prefix_cache.Copies.make(
                                                    [], prefix.copy_length)))
        keep = jnp.zeros((self.max_batch,), bool)
        for w in self.widths:
            for k in STEP_CHOICES:
                self._slots, new = slots_mod.decode_jit(m.graphdef, m.params, self._slots,
                                                        keep, k, w)
                if self._spec is not None:
                    self._spec_call(keep, k, w)
        jax.block_until_ready(self._slots)
        self.timing.clear()

    # ---- the engine thread -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            if not self._pending and not self._busy():
                self._flush()  # about to go idle (otherwise the next device call flushes)
            with self._cv:
                t_idle = time.perf_counter()
                while not self._closing and not self._pending and not self._busy():
                    self._cv.wait()
                self.timing["idle_s"] += time.perf_counter() - t_idle
                if self._closing:
                    break
                admits = []
                for slot in range(self.max_batch):  # lowest free slot first
                    if self._live[slot] is None and self._pending:
                        admits.append((slot, self._pending.popleft()))
                        self._live[slot] = _Live(admits[-1][1], self.model)
            try:
                for slot, job in admits:
                    if job.cancelled:
                        self._retire(slot, "cancelled")
                admits = [(slot, job) for slot, job in admits if not job.cancelled]
                if admits:
                    self._admit(admits)
                    if self._pending and None in self._live:
                        # More arrived during that prefill: admit them now rather than
                        # after a decode call (at most max_batch admissions in a row).
                        continue
                if self._busy():
                    self._decode()
            except Exception as e:  # a failed device call: fail what is in flight, go on
                log.exception("engine step failed")
                self._fail_all(f"internal error in the decode engine: {e}")
        self._fail_all("the server is shutting down")

    def _post(self, job: Job, event: dict) -> None:
        self._outbox.append((job, event))

    def _flush(self) -> None:
        """Hand the held events to their sinks, in order (called before blocking)."""
        outbox, self._outbox = self._outbox, []
        for job, event in outbox:
            job.sink(event)

    def _busy(self) -> bool:
        return any(x is not None for x in self._live)

    def _admit(self, admits: list[tuple[int, Job]]) -> None:
        """Prefill these jobs and deliver each one's first token.

        Short prompts (PACK_MAX tokens in all) go in one packed call: its cost follows
        their tokens, and the group is padded up to a compiled size by repeating its last
        request, which costs no compute (the repeat points at the same packed tokens and
        writes the same values into the same slot). Longer ones are prefilled as batch
        rows in groups of compiled sizes, largest first (6 = 4 + 2), shortest prompts
        first: padding 6 rows to 8 would prefill whole rows for nothing, and the first
        part's requests get their first tokens while the next part runs. Sorting by length
        keeps a long prompt from putting short ones into its larger bucket.
        """
        admits = sorted(admits, key=lambda a: len(a[1].ids))
        hits = []
        if self._prefix is not None:  # requests that reuse cached blocks go their own way
            for slot, job in admits:
                self._reused[slot] = self._prefix.reuse(job.ids, self._bucket)
                job.cached = len(self._reused[slot]) * self._prefix.block
            hits = [(slot, job) for slot, job in admits if job.cached]
            admits = [(slot, job) for slot, job in admits if not job.cached]
        if admits and self._packs(sum(len(job.ids) for _, job in admits)):
            self._admit_group(admits)
            admits = []
        while admits:
            size = max(w for w in self.widths if w <= len(admits))
            self._admit_group(admits[:size])
            admits = admits[size:]
        while hits:
            size = max(w for w in self.widths if w <= len(hits))
            width = self._bucket(max(len(job.ids) - job.cached for _, job in hits[:size]))
            if not self._prefix.fits([job.cached for _, job in hits[:size]], width):
                size = 1  # one of them would run past its row at this width: alone it fits
            self._admit_group(hits[:size], cached=True)
            hits = hits[size:]

    @staticmethod
    def _bucket(n: int) -> int:
        return generation.bucket(n, PROMPT_MIN)

    def _packs(self, n_tokens: int) -> bool:
        return generation.bucket(n_tokens, PROMPT_MIN) <= min(PACK_MAX, self.model.capacity)

    def _admit_group(self, group: list[tuple[int, Job]], cached: bool = False) -> None:
        """Prefill a group (packed, batched, or after its cached blocks), save its prompts'
        blocks in the prefix cache, and deliver the first tokens."""
        m = self.model
        t0 = time.perf_counter()
        rows = [slots_mod.RowSettings.make(
            job.temperature, job.top_k, job.top_p, job.seed, list(job.stop), job.max_tokens,
            m.end_id_vector(job.ignore_eos, job.fim)) for _, job in group]
        slot_n = np.array([s for s, _ in group], np.int32)
        len_n = np.array([len(job.ids) for _, job in group], np.int32)
        if cached:
            self.timing["admit_cached_calls"] += 1
            start_n = np.array([job.cached for _, job in group], np.int32)
            prompt_np, len_n = generation.pad_prompts(
                [job.ids[job.cached:] for _, job in group], m.tokenizer.pad_id, PROMPT_MIN)
            blocks = self._prefix.restore_list([self._reused.get(s, []) for s, _ in group])
            self._slots, first, done = slots_mod.admit_cached_jit(
                m.graphdef, m.params, self._slots, self._prefix.pool, slot_n, start_n,
                prompt_np, len_n, slots_mod.RowSettings.stack(rows), blocks)
        elif self._packs(int(len_n.sum())):
            self.timing["admit_packed_calls"] += 1
            tokens = np.full((generation.bucket(int(len_n.sum()), PROMPT_MIN),),
                             m.tokenizer.pad_id, np.int32)
            tokens[:len_n.sum()] = np.concatenate([job.ids for _, job in group])
            start_n = (np.cumsum(len_n) - len_n).astype(np.int32)
            pad = next(w for w in self.widths if w >= len(group)) - len(group)

            def rep(x):  # the group padded to a compiled size with its last request
                return np.concatenate([x, np.repeat(x[-1:], pad)])

            self._slots, first, done = slots_mod.admit_packed_jit(
                m.graphdef, m.params, self._slots, rep(slot_n), tokens, rep(start_n),
                rep(len_n), slots_mod.RowSettings.stack(rows + rows[-1:] * pad))
        else:
            self.timing["admit_batched_calls"] += 1
            prompt_np, len_n = generation.pad_prompts([job.ids for _, job in group],
                                                      m.tokenizer.pad_id, PROMPT_MIN)
            self._slots, first, done = slots_mod.admit_jit(
                m.graphdef, m.params, self._slots, slot_n, prompt_np, len_n,
                slots_mod.RowSettings.stack(rows))
        if self._spec is not None:  # each slot's prompt, for drafting; its flag and counts
            for _, job in group:
                job.drafting = job.speculative is not False
            self._spec = spec_slots.install_jit(
                self._spec, slot_n, spec_slots.host_prompts(
                    [job.ids for _, job in group], self._spec.prompt_bl.shape[1]),
                np.array([job.drafting for _, job in group]))
        if self._draft is not None:  # the draft model's keys of the whole prompts
            self._draft = draft_slots.admit(
                self.draft_model, self._draft, slot_n, [job.ids for _, job in group],
                slots_mod.RowSettings.stack(rows), m.tokenizer.pad_id, PROMPT_MIN)
        if self._prefix is not None:  # queued behind the prefill, before any later call
            pinned = {id(b) for chain in self._reused.values() for b in chain}
            self.timing["prefix_blocks_saved"] += self._prefix.save(
                self._slots.state.cache,
                [(s, job.ids, self._reused.pop(s, [])) for s, job in group
                 if self._live[s] is not None], pinned)  # not warm-up prompts
        self._flush()
        first, done = jax.device_get((first, done))
        t1 = time.perf_counter()
        for i, (slot, job) in enumerate(group):
            live = self._live[slot]
            if live is None:  # warm-up
                continue
            self.timing["queue_wait_s"] += t0 - job.t_submit
            self._send_text(live, [int(first[i])])
            if done[i]:
                self._retire(slot, None)
        self.timing["admit_device_s"] += t1 - t0
        self.timing["admit_host_s"] += time.perf_counter() - t1
        self.timing["admit_calls"] += 1
        self.timing["admitted"] += len(group)

    def _spec_call(self, keep, steps: int, width: int):
        """One speculative decode call (drafts from the context or the draft model):
        the new ids and the iterations run."""
        m = self.model
        if self._draft is None:
            self._slots, self._spec, new, iters = spec_slots.decode_jit(
                m.graphdef, m.params, self._slots, self._spec, keep, steps, width,
                self.draft_tokens)
        else:
            d = self.draft_model
            self._slots, self._spec, self._draft, new, iters = draft_slots.decode_jit(
                m.graphdef, m.params, d.graphdef, d.params, self._slots, self._spec,
                self._draft, keep, steps, width, self.draft_tokens)
        return new, iters

    def _decode(self) -> None:
        m = self.model
        busy = [i for i, x in enumerate(self._live) if x is not None]
        width = next(w for w in self.widths if w > busy[-1])
        # No call outlasts the shortest remaining budget, so a slot that frees is refilled
        # at once; while a slot is free, calls also stay within call_budget_s, so a
        # newcomer does not wait long for the call in flight.
        remaining = min(self._live[i].job.max_tokens - self._live[i].job.count for i in busy)
        choices = [k for k in STEP_CHOICES if k <= remaining] or [STEP_CHOICES[0]]
        if len(busy) < self.max_batch:
            now = time.perf_counter()
            refill = any(x is None and now - t < self.refill_window_s
                         for x, t in zip(self._live, self._freed_at))
            budget = self.refill_budget_s if refill else self.call_budget_s
            per_step = self._step_s[width]
            if self._spec is not None and any(self._live[i].job.drafting for i in busy):
                per_step = self._spec_step_s[width]
            choices = [k for k in choices if k * per_step <= budget] or [STEP_CHOICES[0]]
        steps = max(choices)
        keep = np.array([x is not None and not x.job.cancelled for x in self._live])
        # While a busy slot drafts, the call verifies drafts (`spec_slots`); the other
        # slots in it get the tokens a plain call would give them.
        spec = self._spec is not None and any(self._live[i].job.drafting for i in busy)
        step_s = self._spec_step_s if spec else self._step_s
        t0 = time.perf_counter()
        if spec:
            new, iters = self._spec_call(jnp.asarray(keep), steps, width)
            self._flush()
            new, done, iters, drafted, accepted = jax.device_get(
                (new, self._slots.state.done_b, iters, self._spec.drafted_b,
                 self._spec.accepted_b))
            n_steps = max(1, int(iters))
            for slot in busy:
                job = self._live[slot].job
                self.drafted += int(drafted[slot]) - job.drafted
                self.accepted += int(accepted[slot]) - job.accepted
                job.drafted, job.accepted = int(drafted[slot]), int(accepted[slot])
        else:
            self._slots, new = slots_mod.decode_jit(m.graphdef, m.params, self._slots,
                                                    jnp.asarray(keep), steps, width)
            self._flush()  # the previous call's text goes out while this one runs
            new, done = jax.device_get((new, self._slots.state.done_b))
            n_steps = max(1, int((new >= 0).sum(axis=1).max()))
        t1 = time.perf_counter()
        step_s[width] = 0.8 * step_s[width] + 0.2 * ((t1 - t0) / n_steps)
        self.timing["decode_device_s"] += t1 - t0
        self.timing["decode_calls"] += 1
        self.timing["decode_steps"] += n_steps
        self.timing["decode_row_steps"] += n_steps * len(busy)
        for slot in busy:
            live = self._live[slot]
            if not keep[slot]:
                self._retire(slot, "cancelled")
                continue
            tokens = [int(t) for t in new[slot] if t >= 0]
            if tokens:
                self._send_text(live, tokens)
            if done[slot]:
                self._retire(slot, None)
        self.timing["decode_host_s"] += time.perf_counter() - t1

    def _send_text(self, live: _Live, tokens: list[int]) -> None:
        text = live.feed(tokens)
        if text:
            self._post(live.job, {"type": "delta", "text": text})

    def _retire(self, slot: int, reason: str | None) -> None:
        """Free the slot and send the job's last text and its final event."""
        live, self._live[slot] = self._live[slot], None
        self._freed_at[slot] = time.perf_counter()
        job = live.job
        if reason is None:
            tail = live.cutter.push(live.decoder.flush()) + live.cutter.finish()
            if tail:
                if job.t_first is None:
                    job.t_first = time.perf_counter()
                self._post(job, {"type": "delta", "text": tail})
            hit_eos = job.last_token in live.end_ids
            reason = "stop" if (live.cutter.stopped or hit_eos
                                or job.count < job.max_tokens) else "length"
        now = time.perf_counter()
        self.finished[reason] += 1
        usage = {"prompt_tokens": len(job.ids), "completion_tokens": job.count,
                 "total_tokens": len(job.ids) + job.count,
                 "prompt_tokens_details": {"cached_tokens": job.cached}}
        spec = None
        if self._spec is not None:  # in OpenAI's names for predicted tokens, and ours
            usage["completion_tokens_details"] = {
                "accepted_prediction_tokens": job.accepted,
                "rejected_prediction_tokens": job.drafted - job.accepted}
            spec = {"drafted_tokens": job.drafted, "accepted_tokens": job.accepted}
        self._post(job, {"type": "done", "finish_reason": reason, "usage": usage,
                  "ttft_ms": ((job.t_first or now) - job.t_submit) * 1e3,
                  "engine_ms": (now - job.t_submit) * 1e3,
                  "speculative": spec,
                  "stop_word": live.cutter.hit,
                  "hit_end": job.count > 0 and job.last_token in live.end_ids})

    def _fail_all(self, message: str) -> None:
        """Tell every job in flight or waiting that it failed, and start from clean slots."""
        self._flush()  # what finished before the failure still gets its end
        with self._cv:
            jobs = [x.job for x in self._live if x is not None] + list(self._pending)
            self._pending.clear()
            self._live = [None] * self.max_batch
        for job in jobs:
            job.sink({"type": "error", "message": message})
        self._reused.clear()
        if self._prefix is not None:  # a failed call may have left blocks half written
            self._prefix.clear()
        if not self._closing:
            m = self.model
            self._slots = slots_mod.init_slots(m.config, self.max_batch, m.capacity,
                                               m.token_table, m.end_id_vector())
            if self._spec is not None:
                self._spec = spec_slots.init_spec(self.max_batch,
                                                  self._slots.state.tokens_bn.shape[1])
