"""Speculative sampling (`spark_model.speculative.accept`): the tokens a verify call emits
have the plain sampler's distribution. Checked against the exact distribution of
"sample from p_j, go on while the sample equals the draft", computed in float64 NumPy with
the cuts applied independently."""

from __future__ import annotations

import itertools
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from spark_model import speculative
from spark_model.sampling import SamplingParams, sample

V, K = 6, 3
LOGITS = np.array([[2.0, 1.2, 0.3, -0.5, 0.9, -1.0],
                   [0.1, 1.5, 1.4, -0.2, 0.0, 0.6],
                   [1.0, -0.3, 0.2, 0.8, 1.1, -2.0],
                   [0.5, 0.4, -1.0, 1.6, 0.2, 0.3]], np.float32)  # (K + 1, V)
DRAFT = np.array([0, 2, 5])  # likely, middling, and cut by top_k=3 at position 2
N = 40_000  # draws per setting


def _probs(logits_v: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The plain sampler's distribution in float64: scale, keep the top_k, then the
    nucleus (a token stays while the mass before it is below top_p), renormalize."""
    z = logits_v.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.ones(len(z), bool) if top_k <= 0 else np.arange(len(z)) < top_k
    p = np.where(keep, np.exp(z[order] - z.max()), 0.0)
    p /= p.sum()
    keep &= np.cumsum(p) - p < top_p
    out = np.zeros(len(z))
    out[order] = np.where(keep, p, 0.0)
    return out / out.sum()


def _sequence_law(p_tv: np.ndarray, draft: np.ndarray, keep_rejected: bool = False) -> dict:
    """P(emitted tokens) of sampling p_0, p_1, ... one at a time and stopping after the
    first token that is not the draft (or after K + 1 tokens). keep_rejected: the law of
    a wrong rule that redraws from p_m itself after a rejection (a control)."""
    law: dict[tuple, float] = {}
    prefix = 1.0
    for m in range(K + 1):
        for tok in range(V):
            if m < K and tok == draft[m]:
                continue
            q = p_tv[m, tok]
            if keep_rejected and m < K:  # rejected with 1 - p(d), then p redrawn in full
                q = (1 - p_tv[m, draft[m]]) * p_tv[m, tok]
            if q > 0:
                law[tuple(draft[:m]) + (tok,)] = prefix * q
        if m < K:
            prefix *= p_tv[m, draft[m]]
    return law


def _chi2_p(counts: Counter, law: dict) -> float:
    """Goodness of fit of counts to law (categories expected < 5 times pooled)."""
    assert set(counts) <= set(law), set(counts) - set(law)
    n = sum(counts.values())
    big = [s for s in law if law[s] * n >= 5]
    obs = [counts[s] for s in big] + [n - sum(counts[s] for s in big)]
    exp = [law[s] * n for s in big] + [n * (1 - sum(law[s] for s in big))]
    if exp[-1] < 1e-9:
        obs, exp = obs[:-1], exp[:-1]
    return float(stats.chisquare(obs, np.array(exp) * sum(obs) / sum(exp)).pvalue)


def _accept(temperature: float, top_k: int, top_p: float, want: bool = True):
    sp = SamplingParams.make(N, temperature, top_k, top_p, seeds=np.arange(N, dtype=np.uint32))
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (N, K + 1, V))
    draft = jnp.broadcast_to(jnp.asarray(DRAFT, jnp.int32), (N, K))
    y, m = jax.jit(speculative.accept)(logits, draft, jnp.full((N,), want), sp, 7)
    return np.asarray(y), np.asarray(m), sp, logits


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0),
                                                       (1.3, 0, 0.8)])
def test_accepted_tokens_follow_the_plain_sampler_law(temperature, top_k, top_p):
    y, m, _, _ = _accept(temperature, top_k, top_p)
    counts = Counter(tuple(row[:n + 1]) for row, n in zip(y.tolist(), m.tolist()))
    p_tv = np.stack([_probs(r, temperature, top_k, top_p) for r in LOGITS])
    assert _chi2_p(counts, _sequence_law(p_tv, DRAFT)) > 1e-4
    # The test has the power to tell a wrong rule: the same counts against the law of
    # redrawing from p (not p without the rejected draft) after a rejection.
    wrong = _sequence_law(p_tv, DRAFT, keep_rejected=True)
    wrong = {s: q / sum(wrong.values()) for s, q in wrong.items()}
    assert _chi2_p(Counter({s: c for s, c in counts.items() if s in wrong}), wrong) < 1e-6
    if top_k == 3:  # a draft outside the kept tokens is never accepted
        assert m.max() == 2


def test_greedy_and_non_drafting_rows():
    y, m, sp, logits = _accept(0.0, 0, 1.0)
    arg = LOGITS.argmax(-1)  # greedy: the drafts the argmax agrees with, then the argmax
    lead = int(np.cumprod(DRAFT == arg[:K]).sum())
    assert np.all(m == lead) and np.all(y[:, :lead + 1] == arg[:lead + 1])
    # A sequence that did not draft emits the plain sampler's own draw at position 0.
    y, m, sp, logits = _accept(1.0, 0, 1.0, want=False)
    assert np.all(m == 0)
    np.testing.assert_array_equal(y[:, 0], np.asarray(sample(logits[:, 0], sp, 7)))


def test_law_helper_sums_to_one():
    """The reference law is a distribution (a check of the test's own arithmetic)."""
    for settings in itertools.product((0.7, 1.3), (0, 3), (1.0, 0.8)):
        p_tv = np.stack([_probs(r, *settings) for r in LOGITS])
        assert sum(_sequence_law(p_tv, DRAFT).values()) == pytest.approx(1.0, abs=1e-12)
