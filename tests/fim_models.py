"""Models for the fill-in-the-middle tests: a SentencePiece vocabulary with FIM pieces, and
random weights whose greedy output varies."""

from __future__ import annotations

from sentencepiece import sentencepiece_model_pb2 as pb

from spark_model import ModelConfig, init_model
from spark_model.tokenizer import Tokenizer

FIM_PIECES = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>"]


def with_fim_pieces(tokenizer: Tokenizer) -> tuple[Tokenizer, int]:
    """`tokenizer` with the four FIM pieces appended as user-defined symbols (as a
    FIM-trained vocabulary has them); returns it and the id of the first appended piece."""
    proto = pb.ModelProto()
    proto.ParseFromString(tokenizer.serialized())
    base = len(proto.pieces)
    for s in FIM_PIECES:
        p = proto.pieces.add()
        p.piece, p.score, p.type = s, 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    return Tokenizer.from_bytes(proto.SerializeToString()), base


def random_model(vocab: int, seed: int = 0, max_seq_len: int = 256):
    """A random model whose greedy chains vary (at the default init_std they repeat one id)."""
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=8, d_ff=64, max_seq_len=max_seq_len, rope_theta=10_000.0,
                      rope_scaling=None, init_std=0.5)
    return init_model(cfg, seed=seed)
