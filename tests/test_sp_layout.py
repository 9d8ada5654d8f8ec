"""The sequence-parallel prefill layout: coverage, block alignment, the home's tail, causal balance."""

import random

import pytest

from infinite.cluster.sp_layout import striped_layout
from infinite.kv.rmanager import blocks_for


def owners(layout):
    """Owner (member index) of every prompt position, from the stripes."""
    out = [None] * layout.prompt_len
    for s in layout.stripes:
        for p in range(s.start, s.end):
            assert out[p] is None, f"position {p} in two stripes"
            out[p] = s.member
    return out


def narrowing(pos):
    return 1.0 / (1.0 + pos / 500)  # rows deep in the prompt a fraction of the first


@pytest.mark.parametrize("L,g,B,stripe,shrink", [(1000, 3, 16, 4, None), (1024, 4, 16, 2, None), (777, 2, 16, 8, None),
                                                 (100, 5, 4, 1, None), (5000, 7, 16, 3, None), (48, 3, 16, 1, None),
                                                 (5000, 3, 16, 8, narrowing), (3000, (0, 1, 2), 16, (8, 2, 5), None),
                                                 (9000, (0, 1, 2), 16, (8, 2, 5), narrowing)])
def test_every_position_once_block_aligned_and_the_last_block_at_home(L, g, B, stripe, shrink):
    members = tuple(range(10, 10 + g)) if isinstance(g, int) else tuple(10 + m for m in g)
    g = len(members)
    lay = striped_layout(L, members, B, stripe, shrink)
    own = owners(lay)
    assert None not in own
    for s in lay.stripes:  # stripes start on block boundaries; only the prompt's end may cut a block
        assert s.start % B == 0 and (s.end % B == 0 or s.end == L)
    assert own[-1] == 0, "the prompt's last block must be the home's: decode appends there"
    assert sum(n for _, n in lay.runs()) == blocks_for(L, B) == sum(lay.segment_blocks(i) for i in range(g))
    assert sum(lay.segment_len(i) for i in range(g)) == L
    assert all(lay.segment_len(i) > 0 for i in range(g))
    # the runs name ranks, oldest block first, as a block table would
    table = [r for r, n in lay.runs() for _ in range(n)]
    assert table == [lay.members[own[b * B]] for b in range(blocks_for(L, B))]


def brute_pairs(layout, i, start, end):
    """(query, key) pairs of member i's segment offsets [start, end) against each member's keys, counted one by one."""
    own = owners(layout)
    mine = [p for p in range(layout.prompt_len) if own[p] == i]
    pairs = [0] * layout.size
    for p in mine[start:end]:
        for k in range(p + 1):
            pairs[own[k]] += 1
    return pairs


def test_chunk_pairs_equal_counting_every_pair():
    rng = random.Random(3)
    for _ in range(60):
        g = rng.randint(1, 5)
        B = rng.choice([2, 4, 16])
        L = rng.randint(g * B, 400)
        lay = striped_layout(L, tuple(range(g)), B, rng.randint(1, 4))
        i = rng.randrange(g)
        n = lay.segment_len(i)
        a = rng.randint(0, n)
        b = rng.randint(a, n)
        w = lay.chunk(i, a, b)
        assert list(w.pairs) == pytest.approx(brute_pairs(lay, i, a, b))
        assert w.queries == b - a
        if b > a:  # keys the chunk's last query sees, per holder
            own = owners(lay)
            last = [p for p in range(L) if own[p] == i][b - 1]
            assert list(w.keys) == [sum(1 for k in range(last + 1) if own[k] == j) for j in range(g)]


@pytest.mark.parametrize("L,g,stripe,shrink", [(200_000, 8, 32, None), (2_000_000, 32, 496, None),
                                               (200_000, 32, 496, None), (40_000, 32, 496, None), (70_000, 2, 496, None),
                                               (2_000_000, 16, 496, lambda p: 7e-5 / (7e-5 + p * 2.8e-9))])
def test_zigzag_rows_balance_the_causal_work_and_contiguous_cuts_do_not(L, g, stripe, shrink):
    B = 16  # full rows in zig-zag pairs, then two half rows (a prompt shorter than a row too)
    lay = striped_layout(L, tuple(range(g)), B, stripe, shrink)
    work = [lay.chunk(i, 0, lay.segment_len(i)).total_pairs for i in range(g)]
    assert sum(work) == pytest.approx(L * (L + 1) / 2)  # every causal pair once
    # what is left is block rounding: a member may get a few blocks more than another, at the prompt's end
    assert max(work) - min(work) <= 4 * B * L
    assert max(work) / min(work) < 1.03
    # equal contiguous cuts: the last cut does 2g - 1 times the first's work
    cut = L / g
    first, last = cut * (cut + 1) / 2, cut * (L - cut) + cut * (cut + 1) / 2
    assert last / first > 2 * g - 1.1


def test_chunks_of_a_segment_add_up_and_bad_ranges_are_refused():
    lay = striped_layout(10_000, (3, 1, 2), 16, 5)
    n = lay.segment_len(1)
    whole = lay.chunk(1, 0, n)
    parts = [lay.chunk(1, a, min(n, a + 97)) for a in range(0, n, 97)]
    assert [sum(p.pairs[j] for p in parts) for j in range(3)] == pytest.approx(list(whole.pairs))
    with pytest.raises(ValueError, match="outside member 1"):
        lay.chunk(1, 0, n + 1)
    with pytest.raises(ValueError, match="too few"):
        striped_layout(20, (0, 1, 2), 16, 1)
    with pytest.raises(ValueError, match="distinct"):
        striped_layout(1000, (0, 0), 16, 1)


def test_unequal_stripes_give_segments_and_work_in_proportion_and_rows_narrow_with_shrink():
    lay = striped_layout(400_000, (0, 1, 2), 16, (100, 50, 25))
    segs = [lay.segment_len(i) for i in range(3)]
    assert segs[0] / segs[1] == pytest.approx(2, rel=0.02) and segs[1] / segs[2] == pytest.approx(2, rel=0.02)
    work = [lay.chunk(i, 0, segs[i]).total_pairs for i in range(3)]
    assert work[0] / work[1] == pytest.approx(2, rel=0.03) and work[1] / work[2] == pytest.approx(2, rel=0.03)
    narrow = striped_layout(400_000, (0, 1, 2), 16, 100, lambda p: 1.0 / (1.0 + p / 50_000))
    first = [s.end - s.start for s in narrow.stripes if s.row == 0]
    deep = [s.end - s.start for s in narrow.stripes if s.row == narrow.rows // 2]
    assert first == [1600] * 3 and max(deep) < 400 and narrow.rows > 4 * striped_layout(400_000, (0, 1, 2), 16, 100).rows


def test_round_chunks_cover_each_members_segment_in_order():
    lay = striped_layout(9_000, (0, 5, 7), 16, 10)
    for i in range(3):
        spans = [lay.round_chunk(i, r) for r in range(lay.rounds)]
        spans = [s for s in spans if s[1] > s[0]]
        assert spans[0][0] == 0 and spans[-1][1] == lay.segment_len(i)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
