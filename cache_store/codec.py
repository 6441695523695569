"""The block record: one self-describing binary value per block, K/V bytes behind a fixed header.

Layout (all little-endian)::

    fixed header (_FIXED, 96 bytes)
        magic b"KVPB" | version u16 | dtype code u8 | reserved u8 |
        namespace 16s | parent 16s | block hash 16s |
        n_tokens u32 | n_layers u32 | payload offset u64 | payload length u64 |
        payload XXH3-64 u64 | n_states u32 | reserved u32
    per K/V layer: K shape (kv_heads, tokens, head_dim) 3 x u32, V shape 3 x u32
    per state tensor (the optional state section, format 2): model layer u16 | slot u8 |
        state index u8 | dtype code u8 | ndim u8 | 2 zero bytes | shape 4 x u32 (zero-padded)
    token ids: n_tokens x u32
    zero padding up to a multiple of 64 (the payload offset)
    payload: for each K/V layer, K bytes then V bytes, each C-contiguous; then each state tensor,
        C-contiguous, starting on a 64-byte boundary of the record (zero padding between)

A model whose layers keep recurrent state (SSM, linear attention, short convolution) stores that
state, as it stands after the block's last token, in the block's own record: still one record
and one key per block, one checksum over K/V and state. ``n_layers`` counts the layers that keep
K/V (zero for a pure state-space model); a state names the model layer it belongs to.

Records come from Redis and disk, i.e. untrusted input: every header field and every length is
checked before the payload is touched, nothing is unpickled or evaluated, and a bad record raises
a specific ``RecordError`` subclass. Decoded tensors are views of the record buffer (no copy).
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import xxhash

from cache_store.hashing import FORMAT_VERSION, HASH_BYTES

MAGIC = b"KVPB"
PAYLOAD_ALIGN = 64
MAX_LAYERS = 4096
MAX_TOKENS = 1 << 20
MAX_STATES = 4 * MAX_LAYERS
STATE_DIMS = 4
MAX_STATE_ELEMENTS = 1 << 31
"""A state tensor has 1..4 dimensions (no batch dimension)."""
CONV_STATE, RECURRENT_STATE = 0, 1
"""The two kinds of state a layer may keep (``StateTensor.slot``)."""

_FIXED = struct.Struct("<4sHBx16s16s16sIIQQQII")
_CHECKSUM_AT = _FIXED.size - 16  # byte offset of the checksum field inside the fixed header
_SHAPE = struct.Struct("<6I")  # K (heads, tokens, dim), V (heads, tokens, dim)
_STATE = struct.Struct("<HBBBB2x4I")  # layer, slot, index, dtype code, ndim, shape

# Explicit, append-only dtype table: the code is what is written to the record.
_DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_CODE_DTYPES: dict[int, torch.dtype] = {code: dtype for dtype, code in _DTYPE_CODES.items()}

Shape3 = tuple[int, int, int]
LayerShape = tuple[Shape3, Shape3]
RecordBuffer = bytes | bytearray | memoryview


class RecordError(ValueError):
    """A record that cannot be trusted; the subclass says why."""


class BadMagic(RecordError):
    pass


class UnsupportedVersion(RecordError):
    pass


class NamespaceMismatch(RecordError):
    pass


class ParentMismatch(RecordError):
    pass


class BlockHashMismatch(RecordError):
    pass


class TokenMismatch(RecordError):
    pass


class DtypeMismatch(RecordError):
    pass


class ShapeMismatch(RecordError):
    pass


class LengthMismatch(RecordError):
    pass


class ChecksumMismatch(RecordError):
    pass


@dataclass(frozen=True)
class StateSpec:
    """What one state tensor of a record is: the model ``layer`` it belongs to, ``slot``
    (``CONV_STATE`` or ``RECURRENT_STATE``), the layer's state ``index``, dtype and shape (no
    batch dimension)."""

    layer: int
    slot: int
    index: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class StateTensor:
    """One state tensor of a layer as it stands after a block's last token (a view of the record
    once decoded)."""

    layer: int
    slot: int
    index: int
    tensor: torch.Tensor

    @property
    def spec(self) -> StateSpec:
        return StateSpec(self.layer, self.slot, self.index, self.tensor.dtype, tuple(self.tensor.shape))


@dataclass(frozen=True)
class RecordHeader:
    """Everything in a record but the payload."""

    version: int
    namespace: bytes
    parent: bytes
    block_hash: bytes
    dtype: torch.dtype
    token_ids: tuple[int, ...]
    layer_shapes: tuple[LayerShape, ...]
    payload_offset: int
    payload_length: int
    checksum: int
    states: tuple[StateSpec, ...] = ()
    state_offsets: tuple[int, ...] = ()
    """Where each state tensor starts, in bytes from the start of the record."""

    @property
    def n_layers(self) -> int:
        return len(self.layer_shapes)

    @property
    def kv_length(self) -> int:
        """Bytes of the K/V part of the payload."""
        return _kv_length(self.layer_shapes, self.dtype)


@dataclass(frozen=True)
class BlockKV:
    """A verified block: zero-copy views of the record's payload.

    ``payload``: the flat payload (per layer, K then V); ``layer_shapes``: per layer
    ``((kv_heads, tokens, k_dim), (kv_heads, tokens, v_dim))``. ``keys[l]``/``values[l]``
    ([kv_heads, tokens, head_dim]) are made on first use; a restore that takes every layer at once
    reads ``stacked()`` instead and never pays for the per-layer views.
    """

    block_hash: bytes
    parent: bytes
    token_ids: tuple[int, ...]
    payload: torch.Tensor
    layer_shapes: tuple[LayerShape, ...]
    states: tuple[StateTensor, ...] = ()
    """The recurrent state after this block (empty when the record carries none)."""

    @property
    def has_state(self) -> bool:
        return bool(self.states)

    @cached_property
    def _layers(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return _split_payload(self.payload, self.layer_shapes)

    @property
    def keys(self) -> list[torch.Tensor]:
        return self._layers[0]

    @property
    def values(self) -> list[torch.Tensor]:
        return self._layers[1]

    def stacked(self) -> torch.Tensor | None:
        """The payload as one ``[n_layers, 2, kv_heads, tokens, head_dim]`` view (index 0 of dim 1
        is K, 1 is V) when every layer's K and V have one shape; ``None`` otherwise."""
        if not self.layer_shapes:
            return None
        k0, v0 = self.layer_shapes[0]
        if k0 != v0 or any(shapes != (k0, v0) for shapes in self.layer_shapes):
            return None
        return self.payload.view(len(self.layer_shapes), 2, *k0)

    @property
    def nbytes(self) -> int:
        return self.payload.nbytes + sum(s.tensor.nbytes for s in self.states)


def dtype_code(dtype: torch.dtype) -> int:
    """The record's code for ``dtype``; ``DtypeMismatch`` for a dtype the format does not carry."""
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        raise DtypeMismatch(f"unsupported dtype {dtype}") from None


def encode_block(
    *,
    namespace: bytes,
    parent: bytes,
    block_hash: bytes,
    token_ids: Sequence[int],
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    states: Sequence[StateTensor] = (),
    dtype: torch.dtype | None = None,
) -> bytearray:
    """Serialize one block. ``keys[l]``/``values[l]``: [kv_heads, n_tokens, head_dim], one dtype;
    ``states``: the layers' recurrent state after the block's last token (optional). A model with
    no K/V layers (a pure state-space model) passes no keys and gives ``dtype``."""
    for name, digest in (("namespace", namespace), ("parent", parent), ("block_hash", block_hash)):
        if len(digest) != HASH_BYTES:
            raise ValueError(f"{name} must be {HASH_BYTES} bytes")
    if len(keys) != len(values) or (not keys and dtype is None):
        raise ValueError("keys and values need one tensor per layer (or no layers and a dtype)")
    if len(keys) > MAX_LAYERS:
        raise ValueError(f"at most {MAX_LAYERS} layers")
    n_tokens = len(token_ids)
    if not 0 < n_tokens <= MAX_TOKENS:
        raise ValueError(f"a block holds 1..{MAX_TOKENS} tokens, got {n_tokens}")
    try:
        token_bytes = struct.pack(f"<{n_tokens}I", *token_ids)
    except struct.error:
        raise ValueError("token ids must fit in an unsigned 32-bit integer") from None
    state_specs = _check_states(states)
    tensors = [t for pair in zip(keys, values, strict=True) for t in pair]  # K_0, V_0, K_1, ...
    dtype = tensors[0].dtype if tensors else dtype
    assert dtype is not None
    if any(t.dtype != dtype for t in tensors):
        raise ValueError("every K/V tensor must have the same dtype")
    ident = (dtype_code(dtype), namespace, parent, block_hash, token_bytes)
    if tensors and tuple(tensors[1].shape) == (first := tuple(tensors[0].shape)):
        # The common case, every K and V alike: reading each tensor's shape costs ~0.3 µs, so let
        # torch.stack check the others while it copies; any surprise takes the general path.
        _check_layer(first, first, n_tokens)
        try:
            return _encode(
                ident, dtype, [(first, first)] * len(keys), tensors, states, state_specs, stack=True
            )
        except _StackDeclined:
            pass
    sizes = [tuple(t.shape) for t in tensors]
    layer_shapes: list[LayerShape] = list(zip(sizes[0::2], sizes[1::2], strict=True))  # type: ignore[arg-type]
    for k_shape, v_shape in set(layer_shapes):
        _check_layer(k_shape, v_shape, n_tokens)
    return _encode(ident, dtype, layer_shapes, tensors, states, state_specs, stack=False)


class _StackDeclined(Exception):
    """torch.stack refused the tensors (a shape differs, or they live on a device)."""


def _check_layer(k_shape: tuple[int, ...], v_shape: tuple[int, ...], n_tokens: int) -> None:
    if len(k_shape) != 3 or len(v_shape) != 3 or k_shape[:2] != v_shape[:2] or k_shape[1] != n_tokens:
        raise ValueError(
            f"K/V must be [kv_heads, {n_tokens}, head_dim] with equal heads, got {k_shape} and {v_shape}"
        )


def _check_states(states: Sequence[StateTensor]) -> tuple[StateSpec, ...]:
    if len(states) > MAX_STATES:
        raise ValueError(f"at most {MAX_STATES} state tensors")
    specs = tuple(s.spec for s in states)
    seen: set[tuple[int, int, int]] = set()
    for spec in specs:
        ident = (spec.layer, spec.slot, spec.index)
        if ident in seen:
            raise ValueError(f"state {ident} given twice")
        seen.add(ident)
        if not (
            0 <= spec.layer < MAX_LAYERS
            and spec.slot in (CONV_STATE, RECURRENT_STATE)
            and 0 <= spec.index < 256
        ):
            raise ValueError(f"state {ident} is outside the format's ranges")
        if not 1 <= len(spec.shape) <= STATE_DIMS or 0 in spec.shape:
            raise ValueError(f"a state tensor has 1..{STATE_DIMS} non-empty dimensions, got {spec.shape}")
        dtype_code(spec.dtype)
    return specs


def _encode(
    ident: tuple[int, bytes, bytes, bytes, bytes],
    dtype: torch.dtype,
    layer_shapes: list[LayerShape],
    tensors: list[torch.Tensor],
    states: Sequence[StateTensor],
    state_specs: tuple[StateSpec, ...],
    *,
    stack: bool,
) -> bytearray:
    """Lay out header and payload in one buffer. ``stack``: copy with a single ``torch.stack``
    (every tensor the same shape), raising ``_StackDeclined`` if torch refuses."""
    code, namespace, parent, block_hash, token_bytes = ident
    n_layers, n_tokens = len(layer_shapes), len(token_bytes) // 4
    if stack:
        k0, v0 = layer_shapes[0]
        shapes = _SHAPE.pack(*k0, *v0) * n_layers
        kv_length = (_numel(k0) + _numel(v0)) * n_layers * dtype.itemsize
    else:
        shapes = b"".join(_SHAPE.pack(*k, *v) for k, v in layer_shapes)
        kv_length = _kv_length(layer_shapes, dtype)
    descriptors = b"".join(_pack_state(spec) for spec in state_specs)
    offset = _payload_offset(n_layers, len(state_specs), n_tokens)
    state_offsets = _state_offsets(offset + kv_length, state_specs)
    end = state_offsets[-1] + state_specs[-1].nbytes if state_specs else offset + kv_length
    length = end - offset
    header = _FIXED.pack(
        MAGIC, FORMAT_VERSION, code, namespace, parent, block_hash, n_tokens, n_layers, offset, length, 0,
        len(state_specs), 0,
    )  # fmt: skip
    head = b"".join((header, shapes, descriptors, token_bytes))
    record = bytearray(end)
    record[: len(head)] = head
    if kv_length:
        flat = torch.frombuffer(record, dtype=dtype, count=kv_length // dtype.itemsize, offset=offset)
        if stack:
            try:
                # One kernel copies every layer (strided sources included) straight into the record,
                # as [2 * n_layers, kv_heads, tokens, head_dim].
                torch.stack(tensors, out=flat.view(len(tensors), *layer_shapes[0][0]))
            except RuntimeError as exc:
                raise _StackDeclined from exc
        else:
            dst_keys, dst_values = _split_payload(flat, layer_shapes)
            for dst, src in zip(dst_keys + dst_values, tensors[0::2] + tensors[1::2], strict=True):
                dst.copy_(src)
    for state, spec, at in zip(states, state_specs, state_offsets, strict=True):
        dst = torch.frombuffer(record, dtype=spec.dtype, count=math.prod(spec.shape), offset=at)
        dst.view(spec.shape).copy_(state.tensor)
    checksum = xxhash.xxh3_64_intdigest(memoryview(record)[offset:])
    struct.pack_into("<Q", record, _CHECKSUM_AT, checksum)
    return record


def _pack_state(spec: StateSpec) -> bytes:
    dims = (*spec.shape, *(0,) * (STATE_DIMS - len(spec.shape)))
    return _STATE.pack(spec.layer, spec.slot, spec.index, dtype_code(spec.dtype), len(spec.shape), *dims)


def _state_offsets(kv_end: int, specs: Sequence[StateSpec]) -> tuple[int, ...]:
    """Where each state tensor starts: on the next 64-byte boundary after the one before."""
    offsets = []
    at = kv_end
    for spec in specs:
        at = -(-at // PAYLOAD_ALIGN) * PAYLOAD_ALIGN
        offsets.append(at)
        at += spec.nbytes
    return tuple(offsets)


def peek_header(record: RecordBuffer) -> RecordHeader:
    """Parse and sanity-check the header (every length included); the payload is not read."""
    view = memoryview(record).cast("B")
    size = len(view)
    if bytes(view[:4]) != MAGIC:
        if size < 4 and MAGIC.startswith(bytes(view)):
            raise LengthMismatch(f"record of {size} bytes is truncated")
        raise BadMagic("not a kvproxy block record")
    if size < 6:
        raise LengthMismatch(f"record of {size} bytes is truncated")
    (version,) = struct.unpack_from("<H", view, 4)
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(f"record format version {version}, this build reads {FORMAT_VERSION}")
    if size < _FIXED.size:
        raise LengthMismatch(f"record of {size} bytes is shorter than its header")
    if view[7] or any(view[_FIXED.size - 4 : _FIXED.size]):
        raise UnsupportedVersion("reserved header fields are set: a format this build does not know")
    (_, _, code, namespace, parent, block_hash, n_tokens, n_layers, offset, length, checksum, n_states, _) = (
        _FIXED.unpack_from(view)
    )
    dtype = _CODE_DTYPES.get(code)
    if dtype is None:
        raise DtypeMismatch(f"unknown dtype code {code}")
    if not 0 < n_tokens <= MAX_TOKENS or not 0 <= n_layers <= MAX_LAYERS or not 0 <= n_states <= MAX_STATES:
        raise ShapeMismatch(f"implausible header: {n_tokens} tokens, {n_layers} layers, {n_states} states")
    states_at = _FIXED.size + n_layers * _SHAPE.size
    tokens_at = states_at + n_states * _STATE.size
    if size < tokens_at + 4 * n_tokens:
        raise LengthMismatch(f"record of {size} bytes is truncated inside its header")
    if offset != _payload_offset(n_layers, n_states, n_tokens):
        raise LengthMismatch(f"payload offset {offset} does not match the header layout")
    layer_shapes = _read_layer_shapes(view, n_layers, n_tokens)
    states = tuple(_read_state(view, states_at + i * _STATE.size) for i in range(n_states))
    if len({(s.layer, s.slot, s.index) for s in states}) != len(states):
        raise ShapeMismatch("a state tensor appears twice")
    kv_length = _kv_length(layer_shapes, dtype)
    state_offsets = _state_offsets(offset + kv_length, states)
    end = state_offsets[-1] + states[-1].nbytes if states else offset + kv_length
    if length != end - offset:
        raise LengthMismatch(f"payload length {length}, its sections need {end - offset}")
    if size != offset + length:
        raise LengthMismatch(f"record is {size} bytes, header says {offset + length}")
    token_ids = struct.unpack_from(f"<{n_tokens}I", view, tokens_at)
    return RecordHeader(
        version=version,
        namespace=namespace,
        parent=parent,
        block_hash=block_hash,
        dtype=dtype,
        token_ids=token_ids,
        layer_shapes=layer_shapes,
        payload_offset=offset,
        payload_length=length,
        checksum=checksum,
        states=states,
        state_offsets=state_offsets,
    )


def _read_layer_shapes(view: memoryview, n_layers: int, n_tokens: int) -> tuple[LayerShape, ...]:
    if n_layers == 0:
        return ()
    dims = struct.unpack_from(f"<{6 * n_layers}I", view, _FIXED.size)
    # The usual case, every layer alike, is checked once.
    uniform = dims[:6] * n_layers == dims
    distinct = [dims[:6]] if uniform else [dims[i : i + 6] for i in range(0, len(dims), 6)]
    for kh, kt, kd, vh, vt, vd in distinct:
        if kt != n_tokens or vt != n_tokens or kh != vh or 0 in (kh, kd, vd):
            raise ShapeMismatch(f"K {(kh, kt, kd)} / V {(vh, vt, vd)} for {n_tokens} tokens")
    if len(distinct) == 1:
        (kh, kt, kd, vh, vt, vd) = distinct[0]
        return (((kh, kt, kd), (vh, vt, vd)),) * n_layers
    return tuple(((r[0], r[1], r[2]), (r[3], r[4], r[5])) for r in distinct)


def _read_state(view: memoryview, at: int) -> StateSpec:
    layer, slot, index, code, ndim, *dims = _STATE.unpack_from(view, at)
    dtype = _CODE_DTYPES.get(code)
    if dtype is None:
        raise DtypeMismatch(f"unknown state dtype code {code}")
    if slot not in (CONV_STATE, RECURRENT_STATE) or layer >= MAX_LAYERS or not 1 <= ndim <= STATE_DIMS:
        raise ShapeMismatch(f"implausible state descriptor: layer {layer}, slot {slot}, {ndim} dims")
    shape, padding = tuple(dims[:ndim]), dims[ndim:]
    if 0 in shape or any(padding) or math.prod(shape) > MAX_STATE_ELEMENTS:
        raise ShapeMismatch(f"implausible state shape {tuple(dims)} ({ndim} dims)")
    return StateSpec(layer, slot, index, dtype, shape)


def decode_block(
    record: RecordBuffer,
    *,
    namespace: bytes,
    parent: bytes,
    block_hash: bytes,
    token_ids: Sequence[int],
    dtype: torch.dtype | None = None,
    layer_shapes: Sequence[LayerShape] | None = None,
    state_specs: Sequence[StateSpec] | None = None,
) -> BlockKV:
    """Verify ``record`` against what the caller expects and return zero-copy tensor views of it.

    ``layer_shapes``: ``[((kv_heads, tokens, k_dim), (kv_heads, tokens, v_dim)), ...]`` per K/V
    layer. ``state_specs``: the state tensors the model keeps; a record may carry none of them (a
    block stored without state) but never others.
    """
    header = peek_header(record)
    if header.namespace != namespace:
        raise NamespaceMismatch("record belongs to another namespace")
    if header.parent != parent:
        raise ParentMismatch("record has another parent block")
    if header.block_hash != block_hash:
        raise BlockHashMismatch("record is stored under another block's key")
    if header.token_ids != tuple(token_ids):
        raise TokenMismatch("record holds other token ids")
    if dtype is not None and header.dtype != dtype:
        raise DtypeMismatch(f"record dtype {header.dtype}, expected {dtype}")
    if (
        layer_shapes is not None
        and header.layer_shapes != tuple(layer_shapes)  # fast path: tuples of tuples
        and header.layer_shapes != _normalize_shapes(layer_shapes)  # lists, torch.Size, ...
    ):
        raise ShapeMismatch("record K/V shapes differ from the model's")
    if header.states and state_specs is not None and header.states != tuple(state_specs):
        raise ShapeMismatch("record state tensors differ from the model's")
    view = memoryview(record).cast("B")
    offset = header.payload_offset
    if xxhash.xxh3_64_intdigest(view[offset:]) != header.checksum:
        raise ChecksumMismatch("payload checksum mismatch")

    with warnings.catch_warnings():
        # bytes from a store are read-only; the views are only ever read (copied into a Cache).
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        kv_count = header.kv_length // header.dtype.itemsize
        if kv_count:
            flat = torch.frombuffer(view, dtype=header.dtype, count=kv_count, offset=offset)
        else:
            flat = torch.empty(0, dtype=header.dtype)
        states = tuple(
            StateTensor(
                spec.layer,
                spec.slot,
                spec.index,
                torch.frombuffer(view, dtype=spec.dtype, count=math.prod(spec.shape), offset=at).view(
                    spec.shape
                ),
            )
            for spec, at in zip(header.states, header.state_offsets, strict=True)
        )
    return BlockKV(
        block_hash=header.block_hash,
        parent=header.parent,
        token_ids=header.token_ids,
        payload=flat,
        layer_shapes=header.layer_shapes,
        states=states,
    )


def _split_payload(
    flat: torch.Tensor, layer_shapes: Sequence[LayerShape]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Views of a flat payload tensor: keys and values per layer, each [kv_heads, tokens, head_dim]."""
    if not layer_shapes:
        return [], []
    (k0, v0), n_layers = layer_shapes[0], len(layer_shapes)
    if all(shapes == (k0, v0) for shapes in layer_shapes):
        # Uniform layers: two strided views and two unbinds instead of ~2 ops per tensor.
        k_numel = _numel(k0)
        layer = k_numel + _numel(v0)
        base = flat.storage_offset()
        ks = flat.as_strided((n_layers, *k0), (layer, k0[1] * k0[2], k0[2], 1), base).unbind(0)
        vs = flat.as_strided((n_layers, *v0), (layer, v0[1] * v0[2], v0[2], 1), base + k_numel).unbind(0)
        return list(ks), list(vs)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    pos = 0
    for k_shape, v_shape in layer_shapes:
        for shape, out in ((k_shape, keys), (v_shape, values)):
            n = _numel(shape)
            out.append(flat[pos : pos + n].view(shape))
            pos += n
    return keys, values


def _normalize_shapes(layer_shapes: Sequence[LayerShape]) -> tuple[LayerShape, ...]:
    return tuple((tuple(int(d) for d in k), tuple(int(d) for d in v)) for k, v in layer_shapes)  # type: ignore[misc]


def _payload_offset(n_layers: int, n_states: int, n_tokens: int) -> int:
    unaligned = _FIXED.size + n_layers * _SHAPE.size + n_states * _STATE.size + 4 * n_tokens
    return -(-unaligned // PAYLOAD_ALIGN) * PAYLOAD_ALIGN


def _kv_length(layer_shapes: Sequence[LayerShape], dtype: torch.dtype) -> int:
    if not layer_shapes:
        return 0
    if all(shapes == layer_shapes[0] for shapes in layer_shapes):
        k, v = layer_shapes[0]
        return (_numel(k) + _numel(v)) * len(layer_shapes) * dtype.itemsize
    return sum(_numel(k) + _numel(v) for k, v in layer_shapes) * dtype.itemsize


def _numel(shape: Shape3) -> int:
    return shape[0] * shape[1] * shape[2]
