"""Tokenised training data: a tokenizer and a token cache built once, and a resumable iterator.

Token cache
    Each training document becomes ``BOS text EOS`` (for a model without BOS, such as an
    imported SmolLM2, ``text SEP`` after a first ``SEP``: see
    `spark_model.tokenizers_io.document_ids`); the documents are concatenated (in corpus
    order) into one flat stream saved as ``train.npy`` (uint16 when the vocabulary fits,
    else int32) and read back memory-mapped. Packed sequence ``i`` is the window
    ``stream[i*L : i*L + L + 1]`` (inputs are its first L tokens, targets its last L), so
    every token except the very first is a target exactly once per epoch and a sequence can
    span a document boundary (attention is not masked at EOS/BOS, as in most LM pretraining).
    Validation documents are stored per document (``val.npy`` plus ``val_offsets.npy``)
    with their UTF-8 byte counts, for bits per byte.

    The cache lives in ``<cache_dir>/tokens-<key>/`` (``cache_dir`` defaults to
    ``$SPARK_CACHE_DIR`` or ``~/.cache/spark``); ``key`` is a SHA-256 of the cache format
    version, every document's name and content hash (train and validation), the tokenizer
    model's bytes and ``seq_len``. Changing any of them builds a new entry; nothing else
    does. Entries are written to a temporary directory and renamed into place, so an
    interrupted build is never mistaken for a finished one.

Tokenizer cache
    Training a SentencePiece model on the stdlib takes ~25 s, so it is cached too, in
    ``<cache_dir>/tokenizers/<key>.model`` with ``key`` = SHA-256 of the training split's
    names and content hashes, the vocabulary size and the source of
    ``spark_model/tokenizer.py`` (a change to the trainer's settings retrains). Trained
    tokenizers carry the fill-in-the-middle control pieces (``fim_tokens=True``: ids 4..6).

Fill-in-the-middle
    With ``fim_rate > 0`` a share of the training documents is rearranged into
    fill-in-the-middle examples before packing (`train.fim_transform`); validation
    documents never are, so bits per byte stay comparable between runs. The rate, the
    transform's own settings and the seed then enter the cache key; at rate 0 the key and
    the stream are exactly those of a run without the transform.

Iterator
    ``BatchIterator`` walks an endless stream of sequence indices: position ``p`` is
    sequence ``perm_e[p % n]`` of epoch ``e = p // n``, where ``perm_e`` is a permutation of
    the ``n`` packed sequences seeded by ``(seed, e)``. Its whole state is the integer
    ``position``; a run restored with the same position sees exactly the batches it would
    have seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from train.corpus import Document

CACHE_FORMAT = 1


class DataError(ValueError):
    """Data that cannot feed training (too little text for one sequence, ...)."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPARK_CACHE_DIR") or Path.home() / ".cache" / "spark")


def _docs_digest(h, docs: Sequence[Document]) -> None:
    for d in docs:
        h.update(d.name.encode("utf-8") + b"\0" + d.sha256.encode("ascii") + b"\n")


# ---- tokenizer ------------------------------------------------------------------------

def tokenizer_key(train_docs: Sequence[Document], vocab_size: int) -> str:
    import spark_model.tokenizer as tokmod

    h = hashlib.sha256(f"tokenizer v1 vocab={vocab_size} fim=1\n".encode())
    h.update(Path(tokmod.__file__).read_bytes())
    _docs_digest(h, train_docs)
    return h.hexdigest()[:32]


def train_or_load_tokenizer(train_docs: Sequence[Document], vocab_size: int,
                            cache_dir: str | os.PathLike | None = None):
    """The tokenizer trained on `train_docs` (from the cache when it was trained before)."""
    from spark_model.tokenizer import Tokenizer, train_tokenizer

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / "tokenizers" / f"{tokenizer_key(train_docs, vocab_size)}.model"
    if path.is_file():
        try:
            tok = Tokenizer.load(path)
            if tok.vocab_size == vocab_size:
                return tok
        except Exception:  # noqa: BLE001 - a damaged cache entry is simply rebuilt
            pass
    tok = train_tokenizer([d.text for d in train_docs], vocab_size, fim_tokens=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tok.save(tmp)
    os.replace(tmp, path)
    return tok


# ---- token cache ----------------------------------------------------------------------

@dataclasses.dataclass
class TokenData:
    """The cached token arrays of one (corpus, tokenizer, seq_len)."""

    path: Path
    key: str
    seq_len: int
    train: np.ndarray  # flat stream, memory-mapped
    val: np.ndarray  # validation documents back to back (each BOS text EOS)
    val_offsets: np.ndarray  # (n_val + 1,) int64: document i is val[off[i]:off[i+1]]
    val_bytes: np.ndarray  # (n_val,) int64 UTF-8 bytes of each validation document
    val_names: list[str]

    @property
    def n_sequences(self) -> int:
        return max(0, (len(self.train) - 1) // self.seq_len)

    def sequence(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        return self.train[start:start + self.seq_len + 1]

    def sequences(self, idx: np.ndarray) -> np.ndarray:
        """Packed sequences `idx` as an (len(idx), seq_len + 1) int32 array."""
        starts = np.asarray(idx, np.int64) * self.seq_len
        cols = np.arange(self.seq_len + 1, dtype=np.int64)
        return np.asarray(self.train[starts[:, None] + cols[None, :]], np.int32)


def token_cache_key(train_docs: Sequence[Document], val_docs: Sequence[Document],
                    tokenizer_bytes: bytes, seq_len: int, fim_rate: float = 0.0,
                    fim_seed: int = 0, fim_lines: float = 0.0) -> str:
    h = hashlib.sha256(f"tokens v{CACHE_FORMAT} seq_len={seq_len}\n".encode())
    h.update(hashlib.sha256(tokenizer_bytes).digest())
    if fim_rate:
        from train.fim_transform import cache_tag
        h.update(cache_tag(fim_rate, fim_seed, fim_lines).encode())
    h.update(b"train\n")
    _docs_digest(h, train_docs)
    h.update(b"val\n")
    _docs_digest(h, val_docs)
    return h.hexdigest()[:32]


def _encode(tokenizer, docs: Sequence[Document], dtype, *, packed: bool = False,
            fim_rate: float = 0.0, fim_seed: int = 0,
            fim_lines: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Docs as one stream of `document_ids` (BOS text EOS, or SEP text SEP for a model
    without BOS), plus offsets; encoded in chunks to bound memory. `packed` (the training
    stream) shares each separator between neighbours: SEP t1 SEP t2 SEP, as such models
    saw their pretraining data. `fim_rate` > 0 rearranges that share of the documents
    (train.fim_transform, seeded by `fim_seed` and each document's name; `fim_lines` of
    them cut at line starts)."""
    from spark_model.tokenizers_io import document_separator, documents_ids

    def chunk_ids(chunk: Sequence[Document]) -> list[list[int]]:
        if not fim_rate:
            return documents_ids(tokenizer, [d.text for d in chunk])
        from train.fim_transform import documents_fim_ids
        return documents_fim_ids(tokenizer, chunk, fim_rate, fim_seed, fim_lines)

    shared = packed and document_separator(tokenizer) is not None
    parts, lengths = [], []
    for start in range(0, len(docs), 256):
        for ids in chunk_ids(docs[start:start + 256]):
            if shared and parts:
                ids = ids[1:]
            parts.append(np.asarray(ids, dtype))
            lengths.append(len(ids))
    stream = np.concatenate(parts) if parts else np.zeros((0,), dtype)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return stream, offsets


def build_token_cache(train_docs: Sequence[Document], val_docs: Sequence[Document],
                      tokenizer, seq_len: int, cache_dir: str | os.PathLike | None = None,
                      *, fim_rate: float = 0.0, fim_seed: int = 0,
                      fim_lines: float = 0.0) -> tuple[TokenData, bool]:
    """Load the cache entry for these inputs, building it if absent; (data, built_now).
    `fim_rate`, `fim_seed`, `fim_lines`: the fill-in-the-middle transform of the training
    stream."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = token_cache_key(train_docs, val_docs, tokenizer.serialized(), seq_len, fim_rate,
                          fim_seed, fim_lines)
    entry = cache / f"tokens-{key}"
    built = False
    if not (entry / "meta.json").is_file():
        built = True
        dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tokens-{key}.", dir=cache))
        try:
            train, _ = _encode(tokenizer, train_docs, dtype, packed=True, fim_rate=fim_rate,
                               fim_seed=fim_seed, fim_lines=fim_lines)
            val, val_offsets = _encode(tokenizer, val_docs, dtype)
            np.save(tmp / "train.npy", train)
            np.save(tmp / "val.npy", val)
            np.save(tmp / "val_offsets.npy", val_offsets)
            np.save(tmp / "val_bytes.npy",
                    np.asarray([d.nbytes for d in val_docs], np.int64))
            meta = {"format": CACHE_FORMAT, "key": key, "seq_len": seq_len,
                    "dtype": np.dtype(dtype).name, "train_tokens": int(len(train)),
                    "train_documents": len(train_docs), "val_tokens": int(len(val)),
                    "val_names": [d.name for d in val_docs]}
            (tmp / "meta.json").write_text(json.dumps(meta))
            try:
                tmp.rename(entry)
            except OSError:  # another process finished the same entry first
                if not (entry / "meta.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((entry / "meta.json").read_text())
    data = TokenData(
        path=entry, key=key, seq_len=seq_len,
        train=np.load(entry / "train.npy", mmap_mode="r"),
        val=np.load(entry / "val.npy", mmap_mode="r"),
        val_offsets=np.load(entry / "val_offsets.npy"),
        val_bytes=np.load(entry / "val_bytes.npy"),
        val_names=list(meta["val_names"]))
    return data, built


# ---- iteration ------------------------------------------------------------------------

class BatchIterator:
    """Seeded, epoch-permuted batches of packed sequences; state = one integer position."""

    def __init__(self, data: TokenData, batch_size: int, seed: int, position: int = 0):
        if data.n_sequences < 1:
            raise DataError(f"the training split has {len(data.train)} tokens: too few for "
                            f"one sequence of seq_len={data.seq_len} (+1); use more data "
                            f"or a smaller --seq-len")
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.position = position
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    @property
    def epoch(self) -> float:
        return self.position / self.data.n_sequences

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.data.n_sequences)
            self._perm_epoch = epoch
        return self._perm  # type: ignore[return-value]

    def indices(self, position: int, count: int) -> np.ndarray:
        n = self.data.n_sequences
        out = np.empty(count, np.int64)
        for j in range(count):
            p = position + j
            out[j] = self._permutation(p // n)[p % n]
        return out

    def next(self) -> np.ndarray:
        """The next (batch_size, seq_len + 1) int32 batch; advances the position."""
        idx = self.indices(self.position, self.batch_size)
        self.position += self.batch_size
        return self.data.sequences(idx)

    def state(self) -> dict:
        return {"position": int(self.position), "seed": int(self.seed),
                "n_sequences": int(self.data.n_sequences)}


# ---- validation windows ---------------------------------------------------------------

@dataclasses.dataclass
class EvalSet:
    """Validation documents cut into scoring windows (the rule of eval/bpb.py).

    Each document (BOS text EOS) is scored in non-overlapping windows: window k covers
    tokens [k*L, k*L + L] and scores its last L tokens given the earlier ones in the window,
    so every token after the first BOS is predicted exactly once. Rows are right-padded with
    0 and masked.
    """

    inputs: np.ndarray  # (W, L) int32
    targets: np.ndarray  # (W, L) int32
    mask: np.ndarray  # (W, L) float32
    n_docs: int
    n_bytes: int
    n_tokens: int  # scored tokens


def eval_set(data: TokenData, max_tokens: int | None = None) -> EvalSet:
    """Windows over the validation documents; with `max_tokens`, a fixed subset: whole
    documents taken in the order of SHA-256 of their names (a deterministic spread over
    the tree, not one package) until the budget is met."""
    L = data.seq_len
    inputs, targets, masks = [], [], []
    n_docs = n_bytes = n_tokens = 0
    order = list(range(len(data.val_offsets) - 1))
    if max_tokens is not None:
        order.sort(key=lambda i: hashlib.sha256(data.val_names[i].encode("utf-8")).digest())
    for i in order:
        if max_tokens is not None and n_docs and n_tokens >= max_tokens:
            break
        toks = np.asarray(data.val[data.val_offsets[i]:data.val_offsets[i + 1]], np.int32)
        if len(toks) < 2:
            continue
        n_docs += 1
        n_bytes += int(data.val_bytes[i])
        n_tokens += len(toks) - 1
        for start in range(0, len(toks) - 1, L):
            chunk = toks[start:start + L + 1]
            x = np.zeros(L, np.int32)
            y = np.zeros(L, np.int32)
            m = np.zeros(L, np.float32)
            x[:len(chunk) - 1] = chunk[:-1]
            y[:len(chunk) - 1] = chunk[1:]
            m[:len(chunk) - 1] = 1.0
            inputs.append(x)
            targets.append(y)
            masks.append(m)
    if not inputs:
        return EvalSet(np.zeros((0, L), np.int32), np.zeros((0, L), np.int32),
                       np.zeros((0, L), np.float32), 0, 0, 0)
    return EvalSet(np.stack(inputs), np.stack(targets), np.stack(masks),
                   n_docs, n_bytes, n_tokens)
