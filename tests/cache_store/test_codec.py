"""The block record codec: exact round trips, zero-copy views, every corruption rejected by name."""

from __future__ import annotations

import ctypes
import pickle
import struct
from collections.abc import Callable

import numpy as np
import pytest
import torch

from cache_store import codec
from cache_store.codec import (
    BadMagic,
    BlockHashMismatch,
    ChecksumMismatch,
    DtypeMismatch,
    LengthMismatch,
    NamespaceMismatch,
    ParentMismatch,
    RecordError,
    ShapeMismatch,
    TokenMismatch,
    UnsupportedVersion,
    decode_block,
    encode_block,
    peek_header,
)
from cache_store.hashing import block_hashes, namespace_hash

BLOCK = 8
NS = namespace_hash(model_fingerprint="codec-test", block_size=BLOCK, tenant="t")
TOKENS = list(range(100, 100 + 2 * BLOCK))
H0, H1 = block_hashes(TOKENS, BLOCK, NS)
EXPECT = {"namespace": NS, "parent": H0, "block_hash": H1, "token_ids": TOKENS[BLOCK:]}


def _kv(
    layers: int, heads: int, k_dim: int, v_dim: int, dtype: torch.dtype, seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    keys = [torch.randn(heads, BLOCK, k_dim, generator=gen).to(dtype) for _ in range(layers)]
    values = [torch.randn(heads, BLOCK, v_dim, generator=gen).to(dtype) for _ in range(layers)]
    return keys, values


def _record(dtype: torch.dtype = torch.float32, shape: tuple[int, int, int, int] = (2, 2, 4, 4)) -> bytearray:
    keys, values = _kv(*shape, dtype)
    return encode_block(**EXPECT, keys=keys, values=values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("layers", "heads", "k_dim", "v_dim"), [(1, 1, 4, 4), (2, 4, 16, 16), (3, 2, 8, 4), (5, 3, 6, 10)]
)
@pytest.mark.parametrize("as_bytes", [False, True])
def test_round_trip_is_exact_and_zero_copy(
    dtype: torch.dtype, layers: int, heads: int, k_dim: int, v_dim: int, as_bytes: bool
) -> None:
    keys, values = _kv(layers, heads, k_dim, v_dim, dtype)
    record = encode_block(**EXPECT, keys=keys, values=values)
    buf = bytes(record) if as_bytes else record
    shapes = [((heads, BLOCK, k_dim), (heads, BLOCK, v_dim))] * layers
    block = decode_block(buf, **EXPECT, dtype=dtype, layer_shapes=shapes)
    assert block.block_hash == H1 and block.parent == H0 and block.token_ids == tuple(TOKENS[BLOCK:])
    assert block.nbytes == sum(t.nbytes for t in keys + values)
    start = torch.frombuffer(buf, dtype=torch.uint8).data_ptr() if not as_bytes else None
    for got, want in zip(block.keys + block.values, keys + values, strict=True):
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.equal(got, want)
        if start is not None:  # views of the record, not copies
            assert start <= got.data_ptr() and got.data_ptr() + got.nbytes <= start + len(buf)
    stacked = block.stacked()  # [layers, 2, heads, tokens, dim] when K and V share a shape
    if k_dim == v_dim:
        assert stacked is not None and stacked.shape == (layers, 2, heads, BLOCK, k_dim)
        assert torch.equal(stacked[:, 0], torch.stack(keys)) and torch.equal(
            stacked[:, 1], torch.stack(values)
        )
        assert stacked.data_ptr() == block.keys[0].data_ptr()  # a view, like the per-layer ones
    else:
        assert stacked is None
    header = peek_header(buf)
    assert header.payload_offset % codec.PAYLOAD_ALIGN == 0
    assert header.n_layers == layers and header.dtype == dtype


def test_decoded_views_of_read_only_bytes_lie_inside_the_buffer() -> None:
    buf = bytes(_record())
    mv = memoryview(buf)
    block = decode_block(mv, **EXPECT)
    start = ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value
    assert start is not None
    for t in block.keys + block.values:
        assert start <= t.data_ptr() < start + len(buf)


def test_strided_tensors_encode_like_contiguous_ones() -> None:
    # Blocks are sliced out of a [heads, seq, dim] cache: non-contiguous views.
    cache_k = torch.randn(2, 3 * BLOCK, 4)
    cache_v = torch.randn(2, 3 * BLOCK, 6)
    keys = [cache_k[:, BLOCK : 2 * BLOCK, :]] * 2
    values = [cache_v[:, BLOCK : 2 * BLOCK, :]] * 2
    assert not keys[0].is_contiguous()
    strided = encode_block(**EXPECT, keys=keys, values=values)
    dense = encode_block(
        **EXPECT, keys=[k.contiguous() for k in keys], values=[v.contiguous() for v in values]
    )
    assert strided == dense
    uniform = [cache_k[:, :BLOCK, :]] * 4
    assert encode_block(**EXPECT, keys=uniform[:2], values=uniform[2:]) == encode_block(
        **EXPECT, keys=[t.contiguous() for t in uniform[:2]], values=[t.contiguous() for t in uniform[2:]]
    )


def test_layers_that_differ_after_the_first_take_the_general_path() -> None:
    # Layer 0 has K and V alike (the stack fast path's guess), layer 1 has more heads.
    keys = [torch.randn(1, BLOCK, 4), torch.randn(2, BLOCK, 4)]
    values = [torch.randn(1, BLOCK, 4), torch.randn(2, BLOCK, 4)]
    block = decode_block(encode_block(**EXPECT, keys=keys, values=values), **EXPECT)
    assert all(torch.equal(a, b) for a, b in zip(block.keys + block.values, keys + values, strict=True))
    assert block.stacked() is None  # no single [layers, 2, heads, tokens, dim] view exists


def _set(offset: int, fmt: str, value: object) -> Callable[[bytearray], bytearray]:
    def corrupt(rec: bytearray) -> bytearray:
        struct.pack_into(fmt, rec, offset, value)
        return rec

    return corrupt


def _flip(offset_from_payload: int) -> Callable[[bytearray], bytearray]:
    def corrupt(rec: bytearray) -> bytearray:
        rec[peek_header(rec).payload_offset + offset_from_payload] ^= 0x40
        return rec

    return corrupt


_SHAPES_AT = codec._FIXED.size
_TOKENS_AT = codec._FIXED.size + 2 * codec._SHAPE.size  # two layers in _record()

CORRUPTIONS: list[tuple[str, Callable[[bytearray], bytes | bytearray], type[RecordError]]] = [
    ("magic", lambda r: b"XXXX" + r[4:], BadMagic),
    ("pickle payload", lambda r: pickle.dumps({"keys": [1, 2, 3]}), BadMagic),
    ("empty", lambda r: b"", LengthMismatch),
    ("two bytes", lambda r: r[:2], LengthMismatch),
    ("version", _set(4, "<H", 99), UnsupportedVersion),
    ("dtype code", _set(6, "<B", 77), DtypeMismatch),
    ("reserved byte", _set(7, "<B", 1), UnsupportedVersion),
    ("reserved tail", _set(95, "<B", 1), UnsupportedVersion),
    ("header only half", lambda r: r[:40], LengthMismatch),
    ("truncated payload", lambda r: r[:-1], LengthMismatch),
    ("truncated in tokens", lambda r: r[: _TOKENS_AT + 3], LengthMismatch),
    ("extended", lambda r: r + b"\0", LengthMismatch),
    ("payload length", _set(72, "<Q", 10**15), LengthMismatch),
    ("payload offset", _set(64, "<Q", 128), LengthMismatch),
    ("n_layers huge", _set(60, "<I", 10**6), ShapeMismatch),
    ("n_layers larger", _set(60, "<I", 3), LengthMismatch),
    ("n_tokens zero", _set(56, "<I", 0), ShapeMismatch),
    ("layer tokens", _set(_SHAPES_AT + 4, "<I", BLOCK + 1), ShapeMismatch),
    ("k/v heads differ", _set(_SHAPES_AT + 12, "<I", 3), ShapeMismatch),
    ("head_dim grown", _set(_SHAPES_AT + 8, "<I", 5), LengthMismatch),
    ("namespace", _set(8, "<B", 0), NamespaceMismatch),
    ("parent", _set(24, "<B", 0), ParentMismatch),
    ("block hash", _set(40, "<B", 0), BlockHashMismatch),
    ("token id", _set(_TOKENS_AT, "<I", 7), TokenMismatch),
    ("first payload byte", _flip(0), ChecksumMismatch),
    ("last payload byte", lambda r: r[:-1] + bytes([r[-1] ^ 1]), ChecksumMismatch),
    ("checksum field", _set(80, "<Q", 12345), ChecksumMismatch),
]


@pytest.mark.parametrize(("name", "corrupt", "error"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corruptions_are_rejected_with_their_error(
    name: str, corrupt: Callable[[bytearray], bytes | bytearray], error: type[RecordError]
) -> None:
    bad = corrupt(_record())
    with pytest.raises(error):
        decode_block(bad, **EXPECT)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("namespace", H1, NamespaceMismatch),
        ("parent", NS, ParentMismatch),
        ("block_hash", H0, BlockHashMismatch),
        ("token_ids", TOKENS[:BLOCK], TokenMismatch),
        ("token_ids", TOKENS[BLOCK:-1], TokenMismatch),
    ],
)
def test_expectations_are_checked(field: str, value: object, error: type[RecordError]) -> None:
    with pytest.raises(error):
        decode_block(_record(), **{**EXPECT, field: value})


def test_dtype_and_shape_expectations() -> None:
    record = _record(torch.bfloat16, (2, 2, 4, 4))
    with pytest.raises(DtypeMismatch):
        decode_block(record, **EXPECT, dtype=torch.float16)
    with pytest.raises(ShapeMismatch):
        decode_block(record, **EXPECT, layer_shapes=[((2, BLOCK, 4), (2, BLOCK, 4))])
    with pytest.raises(ShapeMismatch):
        decode_block(record, **EXPECT, layer_shapes=[((2, BLOCK, 4), (2, BLOCK, 8))] * 2)
    decode_block(record, **EXPECT, dtype=torch.bfloat16, layer_shapes=[((2, BLOCK, 4), (2, BLOCK, 4))] * 2)
    as_lists = [[[2, BLOCK, 4], torch.Size([2, BLOCK, 4])]] * 2
    decode_block(record, **EXPECT, layer_shapes=as_lists)  # type: ignore[arg-type]


def test_a_valid_record_of_another_block_is_rejected() -> None:
    keys, values = _kv(1, 1, 4, 4, torch.float32)
    other = encode_block(
        namespace=NS, parent=NS, block_hash=H0, token_ids=TOKENS[:BLOCK], keys=keys, values=values
    )
    with pytest.raises((ParentMismatch, BlockHashMismatch, TokenMismatch)):
        decode_block(other, **EXPECT)


def test_every_truncation_is_a_record_error_not_a_crash() -> None:
    record = bytes(_record())
    for n in range(len(record)):
        with pytest.raises(RecordError):
            decode_block(record[:n], **EXPECT)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keys": [torch.zeros(1, BLOCK, 4)], "values": []}, "one tensor per layer"),
        (
            {"keys": [torch.zeros(1, BLOCK, 4)], "values": [torch.zeros(1, BLOCK, 4, dtype=torch.float16)]},
            "dtype",
        ),
        ({"keys": [torch.zeros(1, BLOCK - 1, 4)], "values": [torch.zeros(1, BLOCK - 1, 4)]}, "kv_heads"),
        ({"keys": [torch.zeros(2, BLOCK, 4)], "values": [torch.zeros(1, BLOCK, 4)]}, "kv_heads"),
        (
            {
                "keys": [torch.zeros(1, BLOCK, 4, dtype=torch.int32)],
                "values": [torch.zeros(1, BLOCK, 4, dtype=torch.int32)],
            },
            "unsupported dtype",
        ),
    ],
)
def test_encode_rejects_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_block(**EXPECT, **kwargs)


@pytest.mark.parametrize("tokens", [[], [-1] * BLOCK, [2**32] * BLOCK])
def test_encode_rejects_bad_token_ids(tokens: list[int]) -> None:
    keys, values = _kv(1, 1, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="token"):
        encode_block(namespace=NS, parent=H0, block_hash=H1, token_ids=tokens, keys=keys, values=values)


def test_numpy_token_ids_encode_like_ints() -> None:
    keys, values = _kv(1, 1, 4, 4, torch.float32)
    ident = {"namespace": NS, "parent": H0, "block_hash": H1}
    as_numpy = encode_block(**ident, token_ids=np.array(TOKENS[BLOCK:]), keys=keys, values=values)
    assert as_numpy == encode_block(**ident, token_ids=TOKENS[BLOCK:], keys=keys, values=values)


def test_dtype_codes_are_fixed() -> None:
    # The codes are written to disk and Redis: they may be appended to, never renumbered.
    assert {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3} == codec._DTYPE_CODES
