"""The record's optional state section (format 2): recurrent state after a block, verified like K/V."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
import torch

from cache_store import codec
from cache_store.codec import (
    CONV_STATE,
    RECURRENT_STATE,
    ChecksumMismatch,
    DtypeMismatch,
    LengthMismatch,
    RecordError,
    ShapeMismatch,
    StateSpec,
    StateTensor,
    UnsupportedVersion,
    decode_block,
    encode_block,
    peek_header,
)
from cache_store.hashing import FORMAT_VERSION, block_hashes, namespace_hash

BLOCK = 8
NS = namespace_hash(model_fingerprint="codec-state-test", block_size=BLOCK, tenant="t")
TOKENS = list(range(200, 200 + 2 * BLOCK))
H0, H1 = block_hashes(TOKENS, BLOCK, NS)
EXPECT = {"namespace": NS, "parent": H0, "block_hash": H1, "token_ids": TOKENS[BLOCK:]}


def _states(seed: int = 0) -> list[StateTensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        # An LFM2/Mamba-style conv state in the model dtype, a float32 SSM state, and a second
        # state of the same layer (transformers keeps several per layer for some models).
        StateTensor(0, CONV_STATE, 0, torch.randn(24, 3, generator=gen).to(torch.bfloat16)),
        StateTensor(0, RECURRENT_STATE, 0, torch.randn(4, 5, 7, generator=gen)),
        StateTensor(2, CONV_STATE, 1, torch.randn(5, generator=gen).to(torch.bfloat16)),
    ]


def _kv() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    keys = [torch.randn(2, BLOCK, 4, generator=gen).to(torch.bfloat16)]
    values = [torch.randn(2, BLOCK, 4, generator=gen).to(torch.bfloat16)]
    return keys, values


def _record() -> bytearray:
    keys, values = _kv()
    return encode_block(**EXPECT, keys=keys, values=values, states=_states())


@pytest.mark.parametrize("as_bytes", [False, True])
def test_states_round_trip_exactly_aligned_and_zero_copy(as_bytes: bool) -> None:
    keys, values = _kv()
    states = _states()
    record = encode_block(**EXPECT, keys=keys, values=values, states=states)
    buf = bytes(record) if as_bytes else record
    specs = [s.spec for s in states]
    block = decode_block(
        buf, **EXPECT, dtype=torch.bfloat16, layer_shapes=[((2, BLOCK, 4), (2, BLOCK, 4))], state_specs=specs
    )
    assert block.has_state and [s.spec for s in block.states] == specs
    assert torch.equal(block.keys[0], keys[0]) and torch.equal(block.values[0], values[0])
    for got, want in zip(block.states, states, strict=True):
        assert (got.layer, got.slot, got.index) == (want.layer, want.slot, want.index)
        assert got.tensor.dtype == want.tensor.dtype and torch.equal(got.tensor, want.tensor)
    assert block.nbytes == sum(t.nbytes for t in keys + values) + sum(s.tensor.nbytes for s in states)
    header = peek_header(buf)
    assert all(at % codec.PAYLOAD_ALIGN == 0 for at in header.state_offsets)
    if not as_bytes:
        start = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
        for got in block.states:  # views of the record, not copies
            assert start <= got.tensor.data_ptr() < start + len(buf)


def test_a_model_without_kv_layers_stores_state_only() -> None:
    states = _states()
    record = encode_block(**EXPECT, keys=[], values=[], states=states, dtype=torch.bfloat16)
    block = decode_block(
        record, **EXPECT, dtype=torch.bfloat16, layer_shapes=[], state_specs=[s.spec for s in states]
    )
    assert block.layer_shapes == () and block.keys == [] and block.stacked() is None
    assert torch.equal(block.states[1].tensor, states[1].tensor)


def test_a_record_without_state_reads_as_such() -> None:
    keys, values = _kv()
    record = encode_block(**EXPECT, keys=keys, values=values)
    block = decode_block(record, **EXPECT, state_specs=[s.spec for s in _states()])
    assert not block.has_state and block.states == ()


def test_a_record_with_other_states_is_rejected() -> None:
    wrong = [StateSpec(0, CONV_STATE, 0, torch.bfloat16, (24, 4))] + [s.spec for s in _states()[1:]]
    with pytest.raises(ShapeMismatch, match="state"):
        decode_block(_record(), **EXPECT, state_specs=wrong)
    with pytest.raises(ShapeMismatch, match="state"):
        decode_block(_record(), **EXPECT, state_specs=[s.spec for s in _states()[:2]])


def test_a_format_1_record_is_refused_by_version() -> None:
    old = _record()
    struct.pack_into("<H", old, 4, 1)
    assert FORMAT_VERSION == 2
    with pytest.raises(UnsupportedVersion, match="version 1"):
        decode_block(old, **EXPECT)


def _descriptor_at(i: int) -> int:
    return codec._FIXED.size + 1 * codec._SHAPE.size + i * codec._STATE.size


def _set(offset: int, fmt: str, value: int) -> Callable[[bytearray], bytearray]:
    def corrupt(rec: bytearray) -> bytearray:
        struct.pack_into(fmt, rec, offset, value)
        return rec

    return corrupt


STATE_CORRUPTIONS: list[tuple[str, Callable[[bytearray], bytes | bytearray], type[RecordError]]] = [
    ("n_states larger", _set(88, "<I", 4), RecordError),  # token ids read as a descriptor
    ("n_states huge", _set(88, "<I", 10**6), ShapeMismatch),
    ("reserved after n_states", _set(92, "<I", 1), UnsupportedVersion),
    ("slot", _set(_descriptor_at(0) + 2, "<B", 9), ShapeMismatch),
    ("state dtype", _set(_descriptor_at(1) + 4, "<B", 77), DtypeMismatch),
    ("ndim zero", _set(_descriptor_at(1) + 5, "<B", 0), ShapeMismatch),
    ("ndim five", _set(_descriptor_at(1) + 5, "<B", 5), ShapeMismatch),
    ("dim zero", _set(_descriptor_at(1) + 8, "<I", 0), ShapeMismatch),
    ("dim grown", _set(_descriptor_at(1) + 8, "<I", 5), LengthMismatch),
    ("padding dim set", _set(_descriptor_at(0) + 16, "<I", 2), ShapeMismatch),
    ("state byte", lambda r: r[:-3] + bytes([r[-3] ^ 0x10]) + r[-2:], ChecksumMismatch),
    ("truncated state", lambda r: r[:-1], LengthMismatch),
]


@pytest.mark.parametrize(
    ("name", "corrupt", "error"), STATE_CORRUPTIONS, ids=[c[0] for c in STATE_CORRUPTIONS]
)
def test_state_corruptions_are_rejected_with_their_error(
    name: str, corrupt: Callable[[bytearray], bytes | bytearray], error: type[RecordError]
) -> None:
    with pytest.raises(error):
        decode_block(corrupt(_record()), **EXPECT)


def test_duplicate_state_descriptors_are_rejected() -> None:
    rec = _record()
    # Make state 2 a copy of state 0's identity (layer 0, conv, index 0) with its own shape.
    struct.pack_into("<HBB", rec, _descriptor_at(2), 0, CONV_STATE, 0)
    with pytest.raises(ShapeMismatch, match="twice"):
        peek_header(rec)


def test_every_truncation_is_a_record_error() -> None:
    rec = bytes(_record())
    for cut in range(len(rec)):
        with pytest.raises(RecordError):
            decode_block(rec[:cut], **EXPECT)


@pytest.mark.parametrize(
    ("states", "message"),
    [
        (
            [StateTensor(0, CONV_STATE, 0, torch.zeros(3)), StateTensor(0, CONV_STATE, 0, torch.zeros(3))],
            "twice",
        ),
        ([StateTensor(0, 7, 0, torch.zeros(3))], "ranges"),
        ([StateTensor(0, CONV_STATE, 0, torch.zeros(1, 1, 1, 1, 1))], "dimensions"),
        ([StateTensor(0, CONV_STATE, 0, torch.zeros(3, 0))], "dimensions"),
        ([StateTensor(0, CONV_STATE, 0, torch.zeros(3, dtype=torch.int64))], "unsupported dtype"),
    ],
)
def test_encode_rejects_bad_states(states: list[StateTensor], message: str) -> None:
    keys, values = _kv()
    with pytest.raises((ValueError, DtypeMismatch), match=message):
        encode_block(**EXPECT, keys=keys, values=values, states=states)


def test_encode_needs_a_dtype_without_kv_layers() -> None:
    with pytest.raises(ValueError, match="dtype"):
        encode_block(**EXPECT, keys=[], values=[], states=_states())
