"""The user-facing model object: `spark_model.load(path)` returns a ready `SparkModel`."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spark_model import chat as chat_format
from spark_model import checkpoint, engine, generation, kernels, packing, scoring, stops
from spark_model import draft_model as draft_mod
from spark_model import speculative as speculative_mod
from spark_model import fim as fim_tokens
from spark_model.config import ModelConfig
from spark_model.kv_cache import KVCache, cache_length, init_cache
from spark_model.bpe import BPETokenizer
from spark_model.tokenizer import Tokenizer
from spark_model.transformer import Transformer, full_logits

# The checkpoint shipped in the repository, used when no path is given.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "spark-tiny"


def default_checkpoint() -> Path:
    """$SPARK_CHECKPOINT if set, else the shipped checkpoints/spark-tiny."""
    return Path(os.environ.get("SPARK_CHECKPOINT") or DEFAULT_CHECKPOINT)


@dataclasses.dataclass(frozen=True)
class Context:
    """Text run through the model once (`SparkModel.prefill_context`): a one-row KV cache
    holding its `length` positions, which `generate_after` continues without recomputing."""

    cache: KVCache
    length: int  # positions filled: BOS and the text's tokens
    capacity: int  # positions the cache was allocated for


def _check_speculative(speculative, draft_tokens) -> int | None:
    """The draft length for a `speculative=` request, None for plain decoding; a
    SpeculationError (one line) for anything it cannot serve."""
    if speculative is None:
        return None
    if speculative != "prompt_lookup" and not isinstance(speculative, SparkModel):
        raise speculative_mod.SpeculationError(
            f"speculative must be None, 'prompt_lookup' or a draft model (a loaded "
            f"SparkModel), got {speculative!r}")
    return speculative_mod.check_draft_tokens(draft_tokens)


class SparkModel:
    """A model, its tokenizer and config, loaded from one checkpoint directory.

    `generate` and `stream` run the compiled decode engine over a KV cache of
    `capacity` positions per sequence, allocated once per batch size and reused.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer | BPETokenizer, path: Path | None = None,
                 *, capacity: int | None = None):
        capacity = model.cfg.max_seq_len if capacity is None else capacity
        if tokenizer.vocab_size != model.cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, "
                             f"model expects {model.cfg.vocab_size}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) \
                or not 2 <= capacity <= model.cfg.max_seq_len:
            raise ValueError(f"capacity must be an integer in [2, {model.cfg.max_seq_len}], "
                             f"got {capacity!r}")
        try:  # refused here, before anything is compiled or allocated
            self._end_vec = generation.end_id_vector(tokenizer.end_ids, model.cfg.vocab_size)
        except ValueError as e:
            raise ValueError(f"tokenizer end_ids {tuple(tokenizer.end_ids)}: {e}") from None
        fim = getattr(tokenizer, "fim", None)
        # An infill also ends at the vocabulary's infill end tokens (<fim_pad>, <file_sep>,
        # ...): the model's own end ids first, then those, as many as the engine takes.
        self._fim_end_vec = None if fim is None else generation.end_id_vector(
            _merged(tokenizer.end_ids, fim.stops)[:engine.MAX_END_IDS], model.cfg.vocab_size)
        if jax.default_backend() == "cpu" and kernels.available():
            model = packing.interleave_model(model)  # the decode kernel's layout, same bytes
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.capacity = capacity
        graphdef, self._params = nnx.split(model)
        self._graphdef = engine.StaticGraph(graphdef)
        self._cache: KVCache | None = None  # the preallocated cache, for one batch size
        self._token_table = stops.token_byte_table(
            [tokenizer.decode_bytes([i]) for i in range(tokenizer.vocab_size)])
        self.last_stats: dict[str, float] = {}  # timing of the latest generate/stream call
        self.train_seq_len: int | None = None  # sequence length it was trained at, if known
        self.source_info: dict = {}  # where it was loaded from (kind, source file, format)

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    @property
    def weights(self) -> str:
        """The weight matrices' format: "f32", "q8_0", "q4_0", "q4_1" or "mixed (...)"."""
        from spark_model import packing

        return packing.weights_label(checkpoint.flat_params(self.model))

    @property
    def param_bytes(self) -> int:
        """Bytes of the parameters as held (packed matrices at their block sizes)."""
        from spark_model import packing

        return packing.param_bytes(checkpoint.flat_params(self.model))

    @property
    def end_ids(self) -> tuple[int, ...]:
        """Every id that ends generation (the tokenizer's `end_ids`)."""
        return tuple(int(i) for i in self._end_vec if i >= 0)

    @property
    def supports_infill(self) -> bool:
        """Whether the vocabulary has fill-in-the-middle tokens (`generate(..., suffix=)`)."""
        return self._fim_end_vec is not None

    def fim_end_ids(self) -> tuple[int, ...]:
        """Every id that ends an infill: the model's end ids, then its infill end tokens."""
        fim_tokens.require(self.tokenizer)
        return tuple(int(i) for i in self._fim_end_vec if i >= 0)

    def end_id_vector(self, ignore_eos: bool = False, fim: bool = False) -> np.ndarray:
        """The engine's (MAX_END_IDS,) end ids, -1 padded; all -1 with ignore_eos; fim:
        those of an infill (`fim_end_ids`)."""
        if ignore_eos:
            return generation.end_id_vector(())
        if fim:
            fim_tokens.require(self.tokenizer)
            return self._fim_end_vec.copy()
        return self._end_vec.copy()

    def text_ids(self, ids: Sequence[int], fim: bool = False) -> list[int]:
        """Generated ids as text shows them: without the end id that ended them (a
        tokenizer may give special tokens a text form, such as "<|im_end|>"); fim: the
        ids of an infill, which its infill end tokens end too."""
        ids = list(ids)
        ends = self.fim_end_ids() if fim else self.end_ids
        return ids[:-1] if ids and ids[-1] in ends else ids

    def fim_prompt_ids(self, prefix: str, suffix: str, middle: str = "",
                       extra: Sequence[tuple[str, str]] = ()) -> list[int]:
        """The infilling prompt for the text around a gap (`spark_model.fim.prompt_ids`);
        raises fim.NoFimTokens (a ValueError) for a model without infilling tokens."""
        return fim_tokens.prompt_ids(self.tokenizer, prefix, suffix, middle, extra)

    def _fim_ids(self, prompts, suffix) -> list[list[int]]:
        """Infilling prompts for `generate(prompts, suffix=...)`: one suffix per prompt."""
        fim_tokens.require(self.tokenizer)
        one = isinstance(prompts, str)
        if one != isinstance(suffix, str):
            raise TypeError("give one suffix string with one prompt string, or a list of "
                            "suffixes as long as the list of prompts")
        prefixes = [prompts] if one else list(prompts)
        suffixes = [suffix] if one else list(suffix)
        if len(prefixes) != len(suffixes):
            raise ValueError(f"{len(prefixes)} prompts but {len(suffixes)} suffixes")
        return [self.fim_prompt_ids(p, s) for p, s in zip(prefixes, suffixes)]

    @property
    def graphdef(self):
        """The model's static structure: an NNX GraphDef, hashed once (`.graphdef` is the
        GraphDef itself); the engine's compiled calls take it as their static argument."""
        return self._graphdef

    @property
    def params(self):
        """The model's parameters as an NNX state (a jit argument of the engine)."""
        return self._params

    @property
    def token_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Bytes of every token id (V, W) and their lengths (V,), for stop strings."""
        return self._token_table

    @property
    def capacity_allocated(self) -> int:
        """Positions the cache really holds: capacity rounded up to whole attention blocks."""
        return cache_length(self.capacity)

    def drop_cache(self) -> None:
        """Free the preallocated KV cache (it is allocated again on the next call)."""
        self._cache = None

    def logits(self, tokens_bt) -> jax.Array:
        """Full causal forward: token ids (B, T) -> f32 logits (B, T, V)."""
        return full_logits(self.model, jnp.asarray(tokens_bt, jnp.int32))

    def nll(self, tokens_bt, targets_bt) -> jax.Array:
        """-log p(targets[b, t] | tokens[b, :t+1]) in nats, (B, T) f32, in memory O(T):
        blockwise attention and chunked logits (`spark_model.scoring`), so sequences up
        to the model's max_seq_len can be scored."""
        tokens = jnp.asarray(tokens_bt, jnp.int32)
        targets = jnp.asarray(targets_bt, jnp.int32)
        if tokens.ndim != 2 or tokens.shape != targets.shape:
            raise ValueError(f"tokens and targets must be (B, T) of one shape, got "
                             f"{tokens.shape} and {targets.shape}")
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"a sequence of {tokens.shape[1]} tokens is longer than the "
                             f"model's {self.config.max_seq_len} positions")
        return scoring.token_nll(self.model, tokens, targets)

    # ---- generation ------------------------------------------------------------------

    def _prepare(self, prompts, ids=None, ignore_eos=False, room=None, fim=False, **kw):
        req = generation.check_request(prompts, **kw)
        if ids is None:
            ids = [self.tokenizer.encode(p, bos=True) for p in req.prompts]
            if not all(ids):  # an empty prompt of a model that adds no BOS
                raise ValueError("an empty prompt gives no tokens for this model (it adds no "
                                 "BOS); give at least one character")
        longest = max(len(x) for x in ids)
        room = self.capacity if room is None else room
        if longest + req.max_new_tokens > room:
            raise ValueError(
                f"prompt of {longest} tokens plus max_new_tokens={req.max_new_tokens} exceeds "
                f"the KV-cache capacity of {room} tokens")
        prompt_bp, len_b = generation.pad_prompts(ids, self.tokenizer.pad_id)
        consts = generation.constants(req, len(ids), self._token_table,
                                      self.end_id_vector(ignore_eos, fim))
        return req, jnp.asarray(prompt_bp), jnp.asarray(len_b), consts

    def _take_cache(self, batch: int) -> KVCache:
        """The preallocated cache for this batch size; its old contents need no clearing,
        since every position is written before any query can reach it."""
        cache, self._cache = self._cache, None  # donated to the engine: never reuse it
        if cache is None or cache.batch != batch:
            del cache  # free the old batch size's memory before allocating the new one
            cache = init_cache(self.config, batch, self.capacity)
        return cache

    def _texts(self, state: engine.DecodeState, req: generation.Request, fim: bool = False
               ) -> list[str]:
        tokens, counts = jax.device_get((state.tokens_bn, state.count_b))
        out = []
        for row, n in zip(tokens, counts):
            cutter = generation.StopCutter(req.stop)
            text = self.tokenizer.decode(self.text_ids(row[:n].tolist(), fim),
                                         errors="replace")
            out.append(cutter.push(text) + cutter.finish())
        return out

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 256, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop: str | Sequence[str] | None = None,
                 suffix: str | Sequence[str] | None = None,
                 speculative: "str | SparkModel | None" = None, draft_tokens: int = 7) -> str | list[str]:
        """Complete one prompt (returns str) or a batch (returns list[str]).

        temperature 0 is greedy; stop strings end a sequence and are not included.
        The whole batch runs as one compiled program: prefill, then the token loop.
        suffix: fill in the middle: the text that follows the gap, one per prompt (the
        prompt is the text before it); needs a model with infilling tokens
        (`supports_infill`), else fim.NoFimTokens.
        speculative="prompt_lookup": decoding that drafts `draft_tokens` (1..8) tokens per
        step by copying from the prompt and output (`spark_model.speculative`); a loaded
        SparkModel with the same tokenizer instead drafts them with that smaller model
        (`spark_model.draft_model`). Greedy output is identical, sampled output has the
        same distribution, and `last_stats` counts drafted and accepted tokens.
        """
        fim = suffix is not None
        ids = self._fim_ids(prompts, suffix) if fim else None
        spec = _check_speculative(speculative, draft_tokens)
        req, prompt_bp, len_b, consts = self._prepare(
            prompts, ids=ids, fim=fim, max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, stop=stop)
        texts = self._texts(self._run(req, prompt_bp, len_b, consts, spec,
                                      self._draft(speculative)), req, fim)
        return texts[0] if isinstance(prompts, str) else texts

    def infill(self, prefixes: str | Sequence[str], suffixes: str | Sequence[str],
               max_new_tokens: int = 256, **kw) -> str | list[str]:
        """The text between each prefix and suffix: `generate(prefixes, suffix=suffixes)`."""
        return self.generate(prefixes, max_new_tokens, suffix=suffixes, **kw)

    def chat(self, messages: Sequence[dict], max_new_tokens: int = 256, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop: str | Sequence[str] | None = None) -> str:
        """The assistant's reply to a conversation, written out by the tokenizer's chat
        template (`spark_model.chat`): messages are {"role": "system" | "user" |
        "assistant", "content": str}. Generation ends at any of the tokenizer's end ids
        (which the reply leaves out), a stop string, or max_new_tokens.

        Raises chat.NoChatTemplate when the tokenizer has no template, chat.ChatError for
        a bad conversation and chat.ChatTemplateError for a broken or unsafe template
        (all ValueErrors).
        """
        ids = chat_format.prompt_ids(self.tokenizer, messages)
        req, prompt_bp, len_b, consts = self._prepare(
            [""], ids=[ids], max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, stop=stop)
        return self._texts(self._run(req, prompt_bp, len_b, consts), req)[0]

    def generate_tokens(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 256,
                        *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                        seed: int = 0, ignore_eos: bool = False,
                        stop: str | Sequence[str] | None = None,
                        speculative: "str | SparkModel | None" = None, draft_tokens: int = 7
                        ) -> list[list[int]]:
        """Token-level generation: prompt ids (BOS included by the caller) -> new ids.

        The ids include the end id that ended a row, if one did. ignore_eos keeps
        generating past every end id, for benchmarks that need exact lengths. stop,
        speculative and draft_tokens as in `generate`.
        """
        spec = _check_speculative(speculative, draft_tokens)
        ids = [[int(t) for t in row] for row in prompt_ids]
        if not ids or any(not row for row in ids):
            raise ValueError("prompt_ids must be a non-empty list of non-empty id lists")
        bad = [t for row in ids for t in row if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} outside [0, {self.config.vocab_size})")
        req, prompt_bp, len_b, consts = self._prepare(
            [""] * len(ids), ids=ids, ignore_eos=ignore_eos, max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop)
        state = self._run(req, prompt_bp, len_b, consts, spec, self._draft(speculative))
        tokens, counts = jax.device_get((state.tokens_bn, state.count_b))
        return [row[:n].tolist() for row, n in zip(tokens, counts)]

    def _draft(self, speculative) -> "SparkModel | None":
        """The draft model of a `speculative=` argument (None for prompt lookup or none),
        checked against this model (`check_draft`)."""
        if not isinstance(speculative, SparkModel):
            return None
        self.check_draft(speculative)
        return speculative

    def check_draft(self, speculative: "SparkModel") -> None:
        """SpeculationError unless `speculative` can draft for this model: the same
        vocabulary, and room for this model's capacity."""
        mine, theirs = self._token_table, speculative._token_table
        if not (mine[0].shape == theirs[0].shape and all(
                np.array_equal(a, b) for a, b in zip(mine, theirs))):
            raise speculative_mod.SpeculationError(
                "the draft model's vocabulary differs from this model's: a draft model must "
                "use the same tokenizer")
        if speculative.config.max_seq_len < self.capacity:
            raise speculative_mod.SpeculationError(
                f"the draft model holds {speculative.config.max_seq_len} positions, fewer "
                f"than this model's capacity of {self.capacity}: load this model with "
                f"capacity=<= {speculative.config.max_seq_len}")

    def _run(self, req, prompt_bp, len_b, consts, draft_tokens: int | None = None,
             draft: "SparkModel | None" = None) -> engine.DecodeState:
        """Prefill and decode; draft_tokens: speculation with that many drafts, from the
        draft model if one is given, else by prompt lookup."""
        t0 = time.perf_counter()
        batch = len(req.prompts)
        cache = self._take_cache(batch)
        n_out = engine.bucket(req.max_new_tokens)
        extra = {}
        if draft_tokens is None:
            state = engine.generate_jit(self._graphdef, self._params, cache, prompt_bp, len_b,
                                        consts, n_out)
        else:
            if draft is None:
                state, sp = speculative_mod.generate_jit(
                    self._graphdef, self._params, cache, prompt_bp, len_b, consts, n_out,
                    draft_tokens)
            else:
                state, sp = draft_mod.generate_jit(
                    self._graphdef, self._params, draft._graphdef, draft._params, cache,
                    init_cache(draft.config, batch, self.capacity), prompt_bp, len_b, consts,
                    n_out, draft_tokens)
            drafted, accepted = jax.device_get((sp.drafted_b, sp.accepted_b))
            extra = {"drafted_tokens": int(np.sum(drafted)),
                     "accepted_tokens": int(np.sum(accepted)), "steps": int(state.step)}
        self._cache = state.cache
        n = int(np.sum(jax.device_get(state.count_b)))  # waits for the device
        dt = time.perf_counter() - t0
        self.last_stats = {"seconds": dt, "new_tokens": n, "tokens_per_s": n / dt, **extra}
        return state

    def prefill_context(self, text: str, *, room: int = 256) -> Context:
        """Run BOS + `text` through the model once, for many `generate_after` calls.

        room: positions kept free after the text for each continuation (its prompt plus
        its new tokens). The cache holds one row: about 2 * n_layers * n_kv_heads *
        head_dim * 4 bytes per position (0.5 GB for `tiny` at 128K).
        """
        if not isinstance(text, str):
            raise TypeError(f"prefill_context takes a string, got {type(text).__name__}")
        ids = self.tokenizer.encode(text, bos=True)
        if not ids:
            raise ValueError("an empty text gives no tokens for this model (it adds no BOS)")
        if isinstance(room, bool) or not isinstance(room, int) or room < 2:
            raise ValueError(f"room must be an integer >= 2, got {room!r}")
        capacity = len(ids) + room
        if capacity > self.config.max_seq_len:
            raise ValueError(f"a context of {len(ids)} tokens plus room={room} exceeds the "
                             f"model's {self.config.max_seq_len} positions")
        req, prompt_bp, len_b, consts = self._prepare(
            "", ids=[ids], room=capacity, max_new_tokens=1, temperature=0.0, top_k=0,
            top_p=1.0, seed=0, stop=None)
        t0 = time.perf_counter()
        state = engine.prefill_jit(self._graphdef, self._params,
                                   init_cache(self.config, 1, capacity), prompt_bp, len_b,
                                   consts, engine.bucket(1))
        jax.block_until_ready(state.cache)
        self.last_stats = {"seconds": time.perf_counter() - t0, "prefill_tokens": len(ids)}
        return Context(state.cache, len(ids), capacity)

    def generate_after(self, context: Context, prompts: str | Sequence[str],
                       max_new_tokens: int = 256, *, temperature: float = 0.0, top_k: int = 0,
                       top_p: float = 1.0, seed: int = 0,
                       stop: str | Sequence[str] | None = None) -> str | list[str]:
        """Continue a prefilled context with each prompt, as one batch.

        The same as generating from the context's tokens followed by each prompt's tokens
        (the prompt is tokenized on its own, without BOS), but the context is not run
        again: its cache is copied into every row and left unchanged for later calls.
        """
        if not isinstance(context, Context):
            raise TypeError(f"context must come from prefill_context, got {type(context).__name__}")
        one = isinstance(prompts, str)
        texts = [prompts] if one else list(prompts)
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else p for p in texts]
        if any(isinstance(p, str) and not x for p, x in zip(texts, ids)):
            raise ValueError("every prompt continuing a context needs at least one token")
        req, prompt_bp, len_b, consts = self._prepare(
            texts, ids=ids, room=context.capacity - context.length,
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, stop=stop)
        chunk = engine.prefill_chunk(prompt_bp.shape[1])
        written = -(-int(max(len_b)) // chunk) * chunk  # the prefill writes whole chunks
        if context.length + written > context.cache.length:
            raise ValueError(f"prompts of {int(max(len_b))} tokens need more room after the "
                             f"context; prefill it with a larger room")
        b = len(texts)
        cache = jax.tree.map(lambda x: jnp.repeat(x, b, axis=0) if b > 1 else jnp.copy(x),
                             context.cache)  # the engine donates (overwrites) its cache
        t0 = time.perf_counter()
        state = engine.continue_jit(self._graphdef, self._params, cache, prompt_bp, len_b,
                                    jnp.full((b,), context.length, jnp.int32), consts,
                                    engine.bucket(req.max_new_tokens))
        out = self._texts(state, req)
        n = int(np.sum(jax.device_get(state.count_b)))
        dt = time.perf_counter() - t0
        self.last_stats = {"seconds": dt, "new_tokens": n, "tokens_per_s": n / dt}
        return out[0] if one else out

    def stream(self, prompt: str, max_new_tokens: int = 256, *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               stop: str | Sequence[str] | None = None,
               suffix: str | None = None) -> Iterator[str]:
        """Yield text pieces as they are generated (never splitting a character).

        The compiled loop runs in chunks of 1, 2, 4 ... 32 tokens, so the first piece
        arrives after prefill plus one step and later chunks amortise the dispatch.
        suffix: fill in the middle, as in `generate`.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"stream takes one prompt string, got {type(prompt).__name__}")
        fim = suffix is not None
        ids = self._fim_ids(prompt, suffix) if fim else None
        req, prompt_bp, len_b, consts = self._prepare(
            prompt, ids=ids, fim=fim, max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, stop=stop)
        return self._stream(req, prompt_bp, len_b, consts, fim)

    def _stream(self, req, prompt_bp, len_b, consts, fim: bool = False) -> Iterator[str]:
        t0 = time.perf_counter()
        state = engine.prefill_jit(self._graphdef, self._params, self._take_cache(1), prompt_bp,
                                   len_b, consts, engine.bucket(req.max_new_tokens))
        decoder = self.tokenizer.stream_decoder()
        cutter = generation.StopCutter(req.stop)
        sent, chunk, ttft = 0, 1, None
        try:
            while True:
                tokens, count, done = jax.device_get(
                    (state.tokens_bn[0], state.count_b[0], state.done_b[0]))
                text = cutter.push(decoder.feed(self.text_ids(tokens[sent:count].tolist(),
                                                              fim)))
                sent = int(count)
                if text:
                    ttft = time.perf_counter() - t0 if ttft is None else ttft
                    yield text
                if done:
                    break
                state = engine.decode_jit(self._graphdef, self._params, state, consts,
                                          state.step + chunk)
                chunk = min(2 * chunk, 32)
            rest = cutter.push(decoder.flush()) + cutter.finish()
            if rest:
                yield rest
        finally:
            self._cache = state.cache  # hand the cache back even if the caller stops early
        dt = time.perf_counter() - t0
        self.last_stats = {"seconds": dt, "new_tokens": sent, "tokens_per_s": sent / dt,
                           "ttft_s": ttft if ttft is not None else dt}

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        return checkpoint.save(path, self.model, self.tokenizer, overwrite=overwrite)

    def __repr__(self) -> str:
        c = self.config
        return (f"SparkModel(path={str(self.path)!r}, d_model={c.d_model}, "
                f"n_layers={c.n_layers}, vocab_size={c.vocab_size})")


def _merged(*groups: Sequence[int]) -> tuple[int, ...]:
    """The ids of every group, in order, each once."""
    out: list[int] = []
    for i in (int(i) for g in groups for i in g):
        if i not in out:
            out.append(i)
    return tuple(out)


def load(path: str | os.PathLike | None = None, *, capacity: int | None = None,
         verify: bool = True, weights: str | None = None) -> SparkModel:
    """Load a model onto the default device: a Spark checkpoint directory (default: the
    shipped one), a GGUF file, a Hugging Face model directory, or the name of a fetched
    model (`spark fetch --list`). What it is comes from the files, not from the name.

    capacity: KV-cache positions per sequence (prompt plus generated tokens); default the
    model's max_seq_len (128K for every preset; an imported model's own context).
    weights: the weight matrices' format (spark_model/packing.py). None (default) keeps
    what the source holds: a GGUF file's Q8_0/Q4_0/Q4_1 blocks stay packed (other block
    types become the nearest of those), a packed checkpoint stays packed, float stays
    float32. "f32" dequantizes; "q8_0", "q4_0" or "q4_1" quantizes a float model at load
    (a tensor already packed in a narrower format is refused rather than widened).
    """
    from spark_model import packing
    from spark_model.formats import detect, load as formats_load

    if weights is not None:
        packing.check_weight_format(weights)

    if path is None:
        root = default_checkpoint()
        if not root.exists():
            raise checkpoint.CheckpointError(
                f"no default checkpoint at {root}; pass a model (spark_model.load(path)) "
                "or set SPARK_CHECKPOINT")
    else:
        root = detect.resolve(path)
    kind = detect.detect(root)
    if kind != "checkpoint":
        model, tokenizer, info = formats_load.load_imported(root, kind, weights)
        capacity = model.cfg.max_seq_len if capacity is None else capacity
        out = SparkModel(model, tokenizer, root.absolute(), capacity=capacity)
        out.source_info = info
        return out
    _, model = checkpoint.load_params(root, verify_hashes=verify)
    notes: list[str] = []
    try:
        model = packing.convert_model(model, weights, notes)
    except packing.QuantError as e:
        raise checkpoint.CheckpointError(f"{root}: {e}") from None
    tokenizer = checkpoint.load_tokenizer(root)
    capacity = model.cfg.max_seq_len if capacity is None else capacity
    out = SparkModel(model, tokenizer, root.absolute(), capacity=capacity)
    meta = json.loads((root / checkpoint.CONFIG_FILE).read_text())
    extra = meta.get("extra") or {}
    train_info = extra.get("train") or {}
    if isinstance(train_info.get("train_seq_len"), int):
        out.train_seq_len = train_info["train_seq_len"]  # scoring windows match training
    out.source_info = {"source": str(root.absolute()), "kind": "checkpoint",
                       "weights": out.weights, **({"notes": notes} if notes else {}),
                       **({"imported_from": extra["imported_from"]}
                          if isinstance(extra.get("imported_from"), dict) else {})}
    return out
