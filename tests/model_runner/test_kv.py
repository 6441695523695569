"""Blocks <-> DynamicCache: slicing, restoring, cropping inside a block, and the codec between."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, MistralConfig

from cache_store.codec import BlockKV, decode_block, encode_block
from cache_store.hashing import block_hashes, namespace_hash, parent_hashes
from model_runner import kv
from model_runner.loading import LoadedModel
from tests.model_runner.conftest import base_tokens

CPU = torch.device("cpu")


def _filled(loaded: LoadedModel, ids: list[int]) -> DynamicCache:
    past = DynamicCache(config=loaded.model.config)
    with torch.inference_mode():
        loaded.model(torch.tensor([ids]), use_cache=True, **{kv.cache_argument(loaded.model): past})
    return past


@pytest.mark.parametrize("kind", ["llama", "gpt2", "mistral"])
@pytest.mark.parametrize("n_tokens", [4, 9, 12])
def test_slice_encode_decode_restore_round_trip(
    kind: str, n_tokens: int, load_tiny: Callable[[str], LoadedModel]
) -> None:
    loaded = load_tiny(kind)
    ids = base_tokens(loaded, 12)
    past = _filled(loaded, ids)
    namespace = namespace_hash(model_fingerprint="x", block_size=4, tenant="t")
    hashes = block_hashes(ids, 4, namespace)
    sliced = kv.slice_blocks(past, 0, 3, 4)
    shapes = kv.layer_shapes(past, 4)
    blocks = []
    for i, ((keys, values), parent) in enumerate(zip(sliced, parent_hashes(hashes, namespace), strict=True)):
        assert all(k.device.type == "cpu" and k.shape == s[0] for k, (s) in zip(keys, shapes, strict=True))
        record = encode_block(
            namespace=namespace,
            parent=parent,
            block_hash=hashes[i],
            token_ids=ids[i * 4 : i * 4 + 4],
            keys=keys,
            values=values,
        )
        blocks.append(
            decode_block(
                bytes(record),
                namespace=namespace,
                parent=parent,
                block_hash=hashes[i],
                token_ids=ids[i * 4 : i * 4 + 4],
                dtype=torch.float32,
                layer_shapes=shapes,
            )
        )
    restored = kv.build_cache(loaded.model.config, blocks, n_tokens, CPU)
    assert restored.get_seq_length() == n_tokens
    for original, layer in zip(past.layers, restored.layers, strict=True):
        assert torch.equal(layer.keys, original.keys[:, :, :n_tokens])
        assert torch.equal(layer.values, original.values[:, :, :n_tokens])


@pytest.mark.parametrize("n_tokens", [8, 7])
def test_layers_of_different_shapes_restore_layer_by_layer(n_tokens: int) -> None:
    """Blocks whose K and V differ in head dim (or whose layers differ) cannot be stacked into one
    tensor; they are restored one layer at a time, to the same values."""
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=50)
    gen = torch.Generator().manual_seed(0)
    parts = [
        (
            [torch.randn(2, 4, 8, generator=gen) for _ in range(2)],
            [torch.randn(2, 4, 6, generator=gen) for _ in range(2)],
        )
        for _ in range(2)
    ]
    blocks = [_block(keys, values) for keys, values in parts]
    assert all(b.stacked() is None for b in blocks)
    restored = kv.build_cache(config, blocks, n_tokens, CPU)
    assert restored.get_seq_length() == n_tokens
    for index, layer in enumerate(restored.layers):
        want_k = torch.cat([keys[index] for keys, _ in parts], dim=1)[:, :n_tokens].unsqueeze(0)
        want_v = torch.cat([values[index] for _, values in parts], dim=1)[:, :n_tokens].unsqueeze(0)
        assert torch.equal(layer.keys, want_k) and torch.equal(layer.values, want_v)


def test_slices_are_views_and_records_outlive_cache_growth(load_tiny: Callable[[str], LoadedModel]) -> None:
    """slice_blocks copies nothing; the record encoded from its views keeps the values even after
    the cache grows (DynamicLayer.update concatenates into a new tensor)."""
    loaded = load_tiny("llama")
    ids = base_tokens(loaded, 8)
    past = _filled(loaded, ids)
    (keys, values), _ = kv.slice_blocks(past, 0, 2, 4)
    cache_storage = past.layers[0].keys.untyped_storage().data_ptr()
    assert keys[0].untyped_storage().data_ptr() == cache_storage
    expected = [k.clone() for k in keys]
    namespace = namespace_hash(model_fingerprint="x", block_size=4, tenant="t")
    block_hash = block_hashes(ids, 4, namespace)[0]
    record = encode_block(
        namespace=namespace,
        parent=namespace,
        block_hash=block_hash,
        token_ids=ids[:4],
        keys=keys,
        values=values,
    )
    with torch.inference_mode():
        cache_kw = kv.cache_argument(loaded.model)
        loaded.model(input_ids=torch.tensor([ids[:1]]), use_cache=True, **{cache_kw: past})
    assert past.get_seq_length() == 9
    decoded = decode_block(
        record, namespace=namespace, parent=namespace, block_hash=block_hash, token_ids=ids[:4]
    )
    for got, want in zip(decoded.keys, expected, strict=True):
        assert torch.equal(got, want)


def _block(keys: list[torch.Tensor], values: list[torch.Tensor]) -> BlockKV:
    digest = bytes(16)
    ids = list(range(1, keys[0].shape[1] + 1))
    record = encode_block(
        namespace=digest, parent=digest, block_hash=digest, token_ids=ids, keys=keys, values=values
    )
    return decode_block(record, namespace=digest, parent=digest, block_hash=digest, token_ids=ids)


def test_out_of_range_requests_are_errors(load_tiny: Callable[[str], LoadedModel]) -> None:
    loaded = load_tiny("llama")
    past = _filled(loaded, base_tokens(loaded, 8))
    with pytest.raises(kv.CacheLayoutError):
        kv.slice_blocks(past, 1, 2, 4)  # tokens 4..12 of an 8-token cache
    (keys, values) = kv.slice_blocks(past, 0, 1, 4)[0]
    block = _block(keys, values)
    with pytest.raises(kv.CacheLayoutError, match="5 tokens"):
        kv.build_cache(loaded.model.config, [block], 5, CPU)
    short = _block(keys[:1], values[:1])
    with pytest.raises(kv.CacheLayoutError, match="layers"):
        kv.build_cache(loaded.model.config, [short], 4, CPU)
    assert kv.build_cache(loaded.model.config, [], 0, CPU).get_seq_length() == 0


def test_storable_range_follows_a_sliding_window() -> None:
    config = MistralConfig(
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=6,
        vocab_size=50,
    )
    past = DynamicCache(config=config)
    past.update(torch.zeros(1, 1, 10, 16), torch.zeros(1, 1, 10, 16), 0)
    assert kv.storable_range(past) == (5, 10)  # the layer keeps the last window - 1 tokens
    with pytest.raises(kv.CacheLayoutError):
        kv.slice_blocks(past, 0, 1, 4)


def test_the_cache_goes_by_the_keyword_the_model_takes(load_tiny: Callable[[str], LoadedModel]) -> None:
    class Legacy(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, past_key_values: object = None) -> None: ...

    assert kv.cache_argument(Legacy()) == "past_key_values"
    loaded = load_tiny("llama")
    name = kv.cache_argument(loaded.model)
    assert name in inspect.signature(loaded.model.forward).parameters
    with warnings.catch_warnings():
        # The deprecated name warns (and goes away in transformers 5.40); the one we pick does not.
        warnings.simplefilter("error", FutureWarning)
        _filled(loaded, base_tokens(loaded, 4))
