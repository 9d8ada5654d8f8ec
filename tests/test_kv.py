"""Block accounting of the rManager: every block is free, used or lent, exactly once."""

import random

import pytest

from infinite.kv import BlockPool, RBlock, RManager, blocks_for


def test_pool_allocate_free_and_errors():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free == 1
    with pytest.raises(MemoryError, match="asked for 2 blocks, 1 free"):
        pool.allocate(2)
    pool.free(a)
    assert pool.num_free == 4
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([a[0]])
    with pytest.raises(ValueError):
        BlockPool(0)


def test_blocks_for():
    assert [blocks_for(n, 16) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


def test_lend_borrow_accounting():
    rm = RManager(rank=1, num_blocks=10, block_size=16)
    rm.allocate("a", 3)
    lent = rm.lend(debtor=0, request_id="x", n=4)
    rm.append_remote("a", [RBlock(2, 7), RBlock(2, 8)])
    s = rm.stats()
    assert (s["free_blocks"], s["used_blocks"], s["lent_blocks"], s["borrowed_blocks"]) == (3, 3, 4, 2)
    assert rm.table("a")[:3] == [RBlock(1, b) for b in range(3)]
    remote = rm.free_request("a")
    assert remote == [RBlock(2, 7), RBlock(2, 8)]
    assert rm.release_lent(0, "x", lent[:1]) == 1
    assert rm.release_lent(0, "x") == 3
    s = rm.stats()
    assert (s["free_blocks"], s["used_blocks"], s["lent_blocks"], s["borrowed_blocks"]) == (10, 0, 0, 0)
    with pytest.raises(RuntimeError, match="not lent"):
        rm.release_lent(0, "x", [0])


def test_random_mixes_return_every_block():
    rng = random.Random(1234)
    for trial in range(50):
        n = rng.randint(8, 64)
        rm = RManager(0, n, 16)
        live: dict[str, int] = {}
        lent: list[tuple[int, str]] = []
        for step in range(200):
            op = rng.random()
            if op < 0.4:
                rid = f"r{trial}-{step}"
                k = rng.randint(1, 6)
                if k <= rm.num_free:
                    rm.allocate(rid, k)
                    live[rid] = k
            elif op < 0.6 and live:
                rid = rng.choice(list(live))
                k = rng.randint(1, 3)
                if k <= rm.num_free:
                    rm.allocate(rid, k)
                    live[rid] += k
            elif op < 0.7:
                k = rng.randint(1, 4)
                if k <= rm.num_free:
                    key = (rng.randint(1, 3), f"remote{step}")
                    rm.lend(key[0], key[1], k)
                    lent.append(key)
            elif op < 0.85 and live:
                rid = rng.choice(list(live))
                rm.free_request(rid)
                del live[rid]
            elif lent:
                rm.release_lent(*lent.pop(rng.randrange(len(lent))))
            s = rm.stats()
            assert s["free_blocks"] + s["used_blocks"] + s["lent_blocks"] == n
            assert s["used_blocks"] == sum(live.values())
        for rid in list(live):
            rm.free_request(rid)
        for key in lent:
            rm.release_lent(*key)
        assert rm.num_free == n and rm.num_used == 0 and rm.num_lent == 0
