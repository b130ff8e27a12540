"""Draft-model speculation in the serving engine's slots (`spark_model.draft_model`'s
drafts and `spark_model.speculative`'s verify step, over the persistent batch of
`spark_model.serve.slots`).

The draft model gets a batch of its own: a `slots.Slots` with one cache row per slot
(its decode state is not used), filled at admission by the same prefill the model's slots
use (`slots.admit_jit`, run with the draft model's parameters on the whole prompt, also
when the model itself reused a prefix from the prefix cache: the draft's keys are not
cached) and `prev_b`, each slot's token before its last one. While any busy slot
speculates, the engine's decode calls run `decode_jit` below: each iteration the draft
model proposes k tokens for every slot (`draft_model.propose`), and
`speculative.verify_or_step` verifies them in one row-exact call of the model for the
slots that speculate, or steps once when none does. A slot that does not speculate takes
only the first row, sampled with its own settings and step, as in `spec_slots`. The
per-slot flags and counts live in a `spec_slots.SpecSlots` (its prompts are not used
here). There is no back-off: the draft model always proposes, and the counts tell
whether it pays.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from spark_model import draft_model, engine, generation
from spark_model.serve import slots as slots_mod
from spark_model.serve.slots import Slots, _put_row
from spark_model.serve.spec_slots import SpecSlots, narrow, widen
from spark_model.speculative import emit_tokens, verify_or_step


@struct.dataclass
class DraftSlots:
    """The draft model's batch: its cache rows (in `slots`) and each slot's token before
    its last one."""

    slots: Slots
    prev_b: jax.Array  # (B,)


def init_draft(draft, batch: int, capacity: int) -> DraftSlots:
    """Empty rows for a draft model (a SparkModel) beside a batch of `batch` slots."""
    s = slots_mod.init_slots(draft.config, batch, capacity, draft.token_table,
                             draft.end_id_vector())
    return DraftSlots(slots=s, prev_b=jax.device_put(jnp.zeros((batch,), jnp.int32),
                                                     jax.devices()[0]))


def admit(draft, ds: DraftSlots, slot_n: np.ndarray, prompts: list[list[int]],
          rows: slots_mod.RowSettings, pad_id: int, bucket_min: int) -> DraftSlots:
    """Prefill the draft model on whole prompts into slots slot_n (rows: the requests'
    settings, needed by the shared prefill program; its first tokens are not used)."""
    prompt_np, len_n = generation.pad_prompts(prompts, pad_id, bucket_min)
    s, _, _ = slots_mod.admit_jit(draft.graphdef, draft.params, ds.slots, slot_n,
                                  prompt_np, len_n, rows)
    return _set_prev(ds.replace(slots=s), slot_n, np.array([p[-1] for p in prompts],
                                                           np.int32))


@functools.partial(jax.jit, donate_argnums=(0,))
def _set_prev(ds: DraftSlots, slot_n: jax.Array, prev_n: jax.Array) -> DraftSlots:
    return ds.replace(prev_b=ds.prev_b.at[slot_n].set(prev_n))


@functools.partial(jax.jit, static_argnums=(0, 2, 8, 9, 10), donate_argnums=(4, 5, 6))
def decode_jit(graphdef, params, draft_graphdef, draft_params, slots: Slots,
               spec: SpecSlots, ds: DraftSlots, keep_b: jax.Array, n_steps: int, width: int,
               k: int) -> tuple[Slots, SpecSlots, DraftSlots, jax.Array, jax.Array]:
    """`spec_slots.decode_jit` with the draft model's k drafts per iteration: up to n_steps
    iterations for the first `width` slots. Returns the three states, the (width,
    n_steps * (k + 1)) ids each slot generated in this call (-1 past its end) and the
    number of iterations run."""
    model = engine.merge(graphdef, params)
    draft = engine.merge(draft_graphdef, draft_params)
    c, s0, sp0 = narrow(slots, spec, keep_b, width)
    dcache0 = ds.slots.state.cache  # whole: rows past `width` are neither read nor written
    rows = jnp.arange(width)

    def cond(carry):
        i, s = carry[0], carry[1]
        return (i < n_steps) & ~jnp.all(s.done_b)

    def body(carry):
        i, s, sp, dcache, prev_b = carry
        pos_b = jnp.where(s.done_b, 0, s.position_b)  # done rows do not widen attention
        want_b = sp.on_b & ~s.done_b
        draft_bk, dcache = draft_model.propose(draft, s.replace(position_b=pos_b), dcache,
                                               prev_b, k)
        cache, y_bt, m_b = verify_or_step(model, s.cache, s.last_b, pos_b, draft_bk, want_b,
                                          c.sampling, s.count_b)
        count0, last0 = s.count_b, s.last_b
        s, _ = emit_tokens(s.replace(cache=cache), y_bt, m_b + 1, c)
        emitted = s.count_b - count0
        # The token now before last: the last accepted draft, or the old last if none.
        prev = jnp.where(m_b > 0, y_bt[rows, jnp.maximum(m_b - 1, 0)], last0)
        sp = sp.replace(drafted_b=sp.drafted_b + jnp.where(want_b, k, 0),
                        accepted_b=sp.accepted_b + jnp.minimum(m_b, emitted))
        return i + 1, s, sp, dcache, jnp.where(emitted > 0, prev, prev_b)

    iters, s, sp, dcache, prev_b = jax.lax.while_loop(
        cond, body, (jnp.zeros((), jnp.int32), s0, sp0, dcache0, ds.prev_b[:width]))
    slots, spec, new = widen(slots, spec, s0, s, sp, n_steps * (k + 1))
    ds = ds.replace(slots=ds.slots.replace(state=ds.slots.state.replace(cache=dcache)),
                    prev_b=_put_row(ds.prev_b, prev_b, jnp.zeros((), jnp.int32)))
    return slots, spec, ds, new, iters
