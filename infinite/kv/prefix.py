"""Names of full KV blocks, for the prefix cache: a hash chained over the tokens.

vLLM v1's ``kv_cache_utils.hash_block_tokens`` is the model. Block ``i`` of a
sequence is named by a hash of the name of block ``i-1`` and its own tokens,
so a name stands for the whole prefix up to the end of its block: two
requests whose block ``i`` has the same name have the same tokens in blocks
``0..i``, hence the same KV there. Anything else that changes the KV of a
prefix for the same tokens (a tenant's ``cache_salt``) goes into the first
block's hash, and so into every later one. The model, its dtype and the
block size are the same on every instance of a deployment, so they are not
hashed.

Names must be the same in every process of a cluster (a request at home on
one instance uses a prefix cached on another), so they come from a keyed
cryptographic hash (blake2b, 128 bits), never Python's ``hash`` (randomised per
process for strings); a collision would serve the wrong KV, so 128 bits.

*Anchors* are what the heartbeats carry instead of block lists: the names of
blocks at chain depths 1, 2, 4 and then every ``ANCHOR_STRIDE`` blocks, cut to
64 bits. The gManager learns from them, for any prompt, how deep a prefix each
instance holds to within a stride; the holder confirms with the full names.
Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockHash = bytes  # 16 bytes
ROOT = b"infinite-prefix-v1"
ANCHOR_STRIDE = 8  # blocks between anchors past the first few (128 tokens at the default block size)


def hash_block(parent: BlockHash | None, tokens: Sequence[int], salt: str | None = None) -> BlockHash:
    """The name of a full block: its parent's name (None for the first block) and its tokens;
    ``salt`` (cache_salt) only enters the first block (it then reaches every later one)."""
    h = hashlib.blake2b(digest_size=16, key=ROOT)
    if parent is None:
        h.update(b"\x00" if salt is None else b"\x01" + salt.encode("utf-8"))
    else:
        h.update(parent)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def extend_hashes(hashes: list[BlockHash], tokens: Sequence[int], block_size: int, salt: str | None = None,
                  upto: int | None = None) -> list[BlockHash]:
    """Append to ``hashes`` the names of the full blocks of ``tokens`` not named yet (at most
    ``upto`` blocks in all); returns ``hashes``. O(new blocks)."""
    full = len(tokens) // block_size
    if upto is not None:
        full = min(full, upto)
    for i in range(len(hashes), full):
        hashes.append(hash_block(hashes[-1] if hashes else None, tokens[i * block_size:(i + 1) * block_size], salt))
    return hashes


def is_anchor(depth: int) -> bool:
    """Whether the block that ends a prefix of ``depth`` blocks is an anchor (1, 2, 4, then every
    ANCHOR_STRIDE): short prefixes are seen, long ones every stride."""
    return depth in (1, 2, 4) or (depth > 0 and depth % ANCHOR_STRIDE == 0)


def anchor_key(h: BlockHash) -> int:
    """An anchor as it travels on heartbeats: 64 bits of the name (a routing hint only)."""
    return int.from_bytes(h[:8], "little")


def anchors(hashes: Sequence[BlockHash]) -> list[tuple[int, int]]:
    """(depth, anchor key) of every anchor among a sequence's block names, shallowest first."""
    return [(d, anchor_key(hashes[d - 1])) for d in range(1, len(hashes) + 1) if is_anchor(d)]


def deepest_held(chain: Sequence[tuple[int, int]], held: set[int] | frozenset[int]) -> int:
    """Depth in blocks of the deepest anchor of ``chain`` (from ``anchors``) found in ``held``;
    0 when none. Walks from the deep end: a holder of block i's name had blocks 0..i once."""
    for depth, key in reversed(chain):
        if key in held:
            return depth
    return 0
