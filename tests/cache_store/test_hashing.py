"""Block hashing: deterministic, namespaced, chained, full blocks only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cache_store.hashing import (
    HASH_BYTES,
    block_hashes,
    iter_block_hashes,
    namespace_hash,
    parent_hashes,
    tokens_to_bytes,
)

REPO = Path(__file__).resolve().parents[2]


def _ns(**overrides: object) -> bytes:
    fields: dict = {"model_fingerprint": "fp-test", "block_size": 4, "tenant": "acme", "cache_salt": "s1"}
    fields.update(overrides)
    return namespace_hash(**fields)


def test_known_digests_never_change() -> None:
    # Hard-coded per record format: a change here means every stored block on every deployment
    # goes stale. Format 2 (the optional state section) changed them on purpose; format 1's
    # digests stay reproducible, so blocks written by the older release are simply never asked for.
    ns = _ns()
    assert ns.hex() == "f890476336176b4850d43342796fe099"
    assert [h.hex() for h in block_hashes(list(range(10)), 4, ns)] == [
        "bca96893aa5fb74d71560f76ea64ac12",
        "df08a98f52977eb13751c54d9167814d",
    ]
    v1 = _ns(version=1)
    assert v1.hex() == "ae95c8c21990e128b31059dc1be61d7c"
    assert [h.hex() for h in block_hashes(list(range(10)), 4, v1)] == [
        "ae21cfda5846bb12b2da6e548c53b649",
        "2efe173f213e209ef7a5b045016bc9ae",
    ]


_CHILD = """
from cache_store.hashing import block_hashes, namespace_hash
ns = namespace_hash(model_fingerprint="fp-test", block_size=4, tenant="acme", cache_salt="s1")
print(ns.hex(), *(h.hex() for h in block_hashes(list(range(10)), 4, ns)))
"""


def test_same_digests_across_processes_with_different_hash_seeds() -> None:
    outputs = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        done = subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True, cwd=REPO
        )
        outputs.add(done.stdout.strip())
    assert len(outputs) == 1
    ns = _ns()
    assert outputs.pop().split() == [ns.hex(), *(h.hex() for h in block_hashes(list(range(10)), 4, ns))]


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"tenant": "org_1", "cache_salt": "2345"}, {"tenant": "org_12345", "cache_salt": ""}),
        ({"tenant": "a"}, {"tenant": "b"}),
        ({"cache_salt": ""}, {"cache_salt": "x"}),
        ({"model_fingerprint": "m1"}, {"model_fingerprint": "m2"}),
        ({"block_size": 4}, {"block_size": 8}),
        ({"version": 1}, {"version": 2}),
    ],
)
def test_namespace_separates(a: dict, b: dict) -> None:
    assert _ns(**a) != _ns(**b)
    tokens = list(range(8))
    assert set(block_hashes(tokens, 4, _ns(**a))).isdisjoint(block_hashes(tokens, 4, _ns(**b)))


def test_namespace_is_a_hash() -> None:
    assert len(_ns()) == HASH_BYTES
    with pytest.raises(ValueError):
        _ns(block_size=0)


@pytest.mark.parametrize(("n_tokens", "n_blocks"), [(0, 0), (3, 0), (4, 1), (7, 1), (8, 2), (9, 2)])
def test_partial_blocks_are_ignored(n_tokens: int, n_blocks: int) -> None:
    ns = _ns()
    hashes = block_hashes(list(range(n_tokens)), 4, ns)
    assert len(hashes) == n_blocks
    # Appending to the trailing partial block never changes the full blocks' hashes.
    assert block_hashes([*range(n_tokens), 7, 7, 7], 4, ns)[:n_blocks] == hashes


def test_chaining_changing_block_0_changes_every_later_hash() -> None:
    ns = _ns()
    tokens = list(range(20))
    base = block_hashes(tokens, 4, ns)
    changed = block_hashes([99, *tokens[1:]], 4, ns)
    assert all(x != y for x, y in zip(base, changed, strict=True))
    # A change in block 2 keeps blocks 0 and 1.
    later = block_hashes([*tokens[:9], 99, *tokens[10:]], 4, ns)
    assert later[:2] == base[:2]
    assert all(x != y for x, y in zip(base[2:], later[2:], strict=True))


def test_same_block_content_at_another_position_hashes_differently() -> None:
    ns = _ns()
    hashes = block_hashes([1, 2, 3, 4] * 3, 4, ns)
    assert len(set(hashes)) == 3


def test_inputs_agree_list_numpy_iterator() -> None:
    ns = _ns()
    tokens = list(range(1000, 1017))
    expected = block_hashes(tokens, 4, ns)
    assert block_hashes(np.array(tokens, dtype=np.int32), 4, ns) == expected
    assert list(iter_block_hashes(tokens, 4, ns)) == expected


def test_parent_hashes() -> None:
    ns = _ns()
    hashes = block_hashes(list(range(12)), 4, ns)
    assert parent_hashes(hashes, ns) == [ns, hashes[0], hashes[1]]
    assert parent_hashes([], ns) == []


@pytest.mark.parametrize("bad", [[-1], [2**32], [[1, 2]]])
def test_token_ids_must_be_u32(bad: list) -> None:
    with pytest.raises(ValueError):
        tokens_to_bytes(bad)


def test_tokens_are_little_endian_u32() -> None:
    assert tokens_to_bytes([1, 256]) == b"\x01\x00\x00\x00\x00\x01\x00\x00"
