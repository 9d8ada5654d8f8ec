"""SamplingParams validation and the batched Sampler's vLLM semantics."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from infinite.sampling import (
    SampleRow,
    Sampler,
    SamplingParams,
    apply_penalties,
    make_generator,
    process_probs,
)

torch.set_num_threads(1)


def row(params: SamplingParams | None = None, prompt=(), output=(), gen=None, eos=None) -> SampleRow:
    return SampleRow(params or SamplingParams(), list(prompt), list(output), gen, eos)


# ---------------------------------------------------------------- SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (1.0, 1.0, -1, 0.0, 16)
    assert p.stop == [] and p.stop_token_ids == []
    assert (p.ignore_eos, p.seed, p.logprobs, p.n, p.min_tokens) == (False, None, None, 1, 0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.skip_special_tokens and not p.include_stop_str_in_output
    assert not p.greedy and not p.has_penalties


def test_normalisation_and_greedy():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(top_k=0).top_k == -1
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=9e-6).greedy
    assert not SamplingParams(temperature=1e-5).greedy
    assert SamplingParams(temperature=2).temperature == 2.0  # ints accepted for floats
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert SamplingParams(repetition_penalty=1.1).has_penalties


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", -2),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("max_tokens", 0),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("frequency_penalty", 3.0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("logprobs", -1),
        ("logprobs", 21),
        ("n", 0),
        ("min_tokens", -1),
        ("stop", ["ok", ""]),
        ("stop_token_ids", [3, -1]),
        ("seed", 2**64),
    ],
)
def test_bad_value_raises_value_error_naming_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", "1.0"),
        ("top_p", None),
        ("top_k", 2.0),
        ("top_k", True),
        ("max_tokens", 3.5),
        ("n", True),
        ("logprobs", False),
        ("seed", 1.0),
        ("ignore_eos", 1),
        ("stop", 5),
        ("stop", ["a", 3]),
        ("stop_token_ids", [1, "2"]),
        ("presence_penalty", True),
    ],
)
def test_bad_type_raises_type_error_naming_field(field, value):
    with pytest.raises(TypeError, match=field.split("_entry")[0]):
        SamplingParams(**{field: value})


def test_min_tokens_must_not_exceed_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    assert SamplingParams(min_tokens=50, max_tokens=None).min_tokens == 50


def test_clone_is_deep_and_revalidates():
    p = SamplingParams(stop=["x"], stop_token_ids=[1])
    q = p.clone()
    q.stop.append("y")
    q.stop_token_ids.append(2)
    assert p.stop == ["x"] and p.stop_token_ids == [1]
    assert p.clone(temperature=0).greedy and not p.greedy
    with pytest.raises(ValueError, match="top_p"):
        p.clone(top_p=0)
    with pytest.raises(TypeError, match="nope"):
        p.clone(nope=1)


# ---------------------------------------------------------------- greedy / penalties


def test_greedy_equals_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 300, generator=g)
    res = Sampler(0).sample(logits, [row(SamplingParams(temperature=0)) for _ in range(7)])
    assert res.token_ids == logits.argmax(-1).tolist()
    assert res.logprobs is None


def test_sampler_does_not_mutate_input_logits():
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    params = SamplingParams(top_k=3, top_p=0.5, min_p=0.1, repetition_penalty=1.5, presence_penalty=1.0)
    Sampler(0).sample(logits, [row(params, [1, 2], [3, 3]), row(params, [], [4])])
    assert torch.equal(logits, before)


def _reference_penalties(logits: list[float], prompt, output, pres, freq, rep) -> list[float]:
    out = list(logits)
    seen = set(prompt) | set(output)
    for t in seen:
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in set(output):
        out[t] -= pres + freq * output.count(t)
    return out


def test_penalties_match_hand_computed_reference():
    base = [2.0, -1.0, 0.5, -0.5, 3.0, 0.0]
    prompt, output = [0, 1], [2, 2, 3, 4, 4, 4]
    pres, freq, rep = 0.5, 0.25, 2.0
    # By hand: token 0 prompt+positive -> 1.0; 1 prompt+negative -> -2.0;
    # 2 out x2 -> 0.25 - 0.5 - 0.5 = -0.75; 3 out x1 -> -1.0 - 0.5 - 0.25 = -1.75;
    # 4 out x3 -> 1.5 - 0.5 - 0.75 = 0.25; 5 untouched -> 0.0.
    expected = [1.0, -2.0, -0.75, -1.75, 0.25, 0.0]
    assert _reference_penalties(base, prompt, output, pres, freq, rep) == pytest.approx(expected)
    got = apply_penalties(
        torch.tensor([base]), [prompt], [output],
        torch.tensor([pres]), torch.tensor([freq]), torch.tensor([rep]),
    )
    assert got[0].tolist() == pytest.approx(expected)


def test_penalties_batched_rows_independent_and_drive_greedy_choice():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 12, generator=g)
    specs = [
        (SamplingParams(temperature=0, repetition_penalty=1.7), [0, 5], [5, 7]),
        (SamplingParams(temperature=0), [1], [1, 1]),  # no penalties: untouched
        (SamplingParams(temperature=0, presence_penalty=-1.5, frequency_penalty=0.3), [2], [9, 9, 11]),
        (SamplingParams(temperature=0, frequency_penalty=2.0, repetition_penalty=0.8), [], [3, 3, 3]),
    ]
    expected = torch.tensor([
        _reference_penalties(logits[i].tolist(), pr, out, p.presence_penalty, p.frequency_penalty,
                             p.repetition_penalty)
        for i, (p, pr, out) in enumerate(specs)
    ])
    res = Sampler(0).sample(logits, [row(p, pr, out) for p, pr, out in specs])
    assert res.token_ids == expected.argmax(-1).tolist()
    # The penalty must actually change a choice: make token 4 the argmax, then repeat it.
    logits = torch.zeros(1, 5)
    logits[0, 4] = 1.0
    logits[0, 2] = 0.9
    p = SamplingParams(temperature=0, frequency_penalty=0.2)
    assert Sampler().sample(logits, [row(p, [], [])]).token_ids == [4]
    assert Sampler().sample(logits, [row(p, [], [4])]).token_ids == [2]


def test_penalty_token_out_of_vocab_is_rejected():
    with pytest.raises(ValueError, match="out of range"):
        Sampler().sample(torch.zeros(1, 5), [row(SamplingParams(presence_penalty=1.0), [], [5])])


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[2])
    assert Sampler().sample(logits, [row(p, [], [], eos=1)]).token_ids == [3]
    assert Sampler().sample(logits, [row(p, [], [0, 0], eos=1)]).token_ids == [1]


# ---------------------------------------------------------------- filters


def _reference_allowed(logits: torch.Tensor, t: float, k: int, p: float, mp: float) -> set[int]:
    """Per-row, loop-based reference of the allowed set (no ties in the test logits)."""
    x = (logits / t).tolist()
    order = sorted(range(len(x)), key=lambda i: -x[i])
    keep = order[:k] if k > 0 else order
    z = [math.exp(x[i]) for i in keep]
    probs = [v / sum(z) for v in z]
    kept, mass = [], 0.0
    for i, pr in zip(keep, probs):
        kept.append(i)
        mass += pr
        if mass >= p - 1e-6:
            break
    z = [math.exp(x[i]) for i in kept]
    probs = {i: v / sum(z) for i, v in zip(kept, z)}
    top = max(probs.values())
    return {i for i, pr in probs.items() if pr >= mp * top}


@pytest.mark.parametrize(
    "t, k, p, mp",
    [(1.0, 5, 1.0, 0.0), (0.8, -1, 0.6, 0.0), (1.3, -1, 1.0, 0.2), (1.0, 10, 0.8, 0.05), (0.5, 3, 0.99, 0.0)],
)
def test_filters_never_sample_outside_allowed_set(t, k, p, mp):
    v, n = 40, 3000
    logits = torch.randn(v, generator=torch.Generator().manual_seed(7))
    allowed = _reference_allowed(logits, t, k, p, mp)
    assert 1 < len(allowed) < v
    params = SamplingParams(temperature=t, top_k=k, top_p=p, min_p=mp)
    res = Sampler(11).sample(logits.expand(n, v).contiguous(), [row(params) for _ in range(n)])
    drawn = set(res.token_ids)
    assert drawn <= allowed
    # Not degenerate: the most likely allowed tokens are actually drawn.
    probs = process_probs(logits[None], torch.tensor([t]), *_filter_tensors(k, p, mp, v))[0]
    likely = {i for i in allowed if probs[i] > 0.01}
    assert likely <= drawn
    assert {i for i in range(v) if probs[i] > 0} == allowed
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)


def _filter_tensors(k, p, mp, v):
    return (
        torch.tensor([k if k > 0 else v]),
        torch.tensor([p]),
        torch.tensor([mp]),
    )


def test_process_probs_mixed_rows_match_per_row_reference():
    v = 30
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, v, generator=g) * 3
    cfg = [(1.0, 4, 1.0, 0.0), (0.7, -1, 0.5, 0.0), (2.0, -1, 1.0, 0.3), (1.0, -1, 1.0, 0.0)]
    probs = process_probs(
        logits,
        torch.tensor([c[0] for c in cfg]),
        torch.tensor([c[1] if c[1] > 0 else v for c in cfg]),
        torch.tensor([c[2] for c in cfg]),
        torch.tensor([c[3] for c in cfg]),
    )
    for i, (t, k, p, mp) in enumerate(cfg):
        allowed = _reference_allowed(logits[i], t, k, p, mp)
        support = set(torch.nonzero(probs[i]).flatten().tolist())
        assert support == allowed, i
        ref = torch.zeros(v)
        sel = torch.tensor(sorted(allowed))
        ref[sel] = torch.softmax(logits[i, sel] / t, dim=0)
        torch.testing.assert_close(probs[i], ref, atol=1e-6, rtol=1e-5)
    # Row 3 has no filter at all: plain softmax(logits / T).
    torch.testing.assert_close(probs[3], torch.softmax(logits[3], 0))


def test_top_p_always_keeps_at_least_the_top_token():
    logits = torch.tensor([[10.0, 0.0, -1.0, -2.0]])
    probs = process_probs(logits, torch.tensor([1.0]), None, torch.tensor([1e-6]), None)
    assert probs[0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_top_p_tiny_keeps_exactly_one_token_even_when_all_mass_rounds_away():
    # 1 - 1e-9 rounds to 1.0 in float32, so every cumulative sum is <= it.
    probs = process_probs(torch.zeros(1, 7), torch.tensor([1.0]), None, torch.tensor([1e-9]), None)
    assert probs[0].count_nonzero().item() == 1 and probs[0].max().item() == 1.0


def test_top_p_boundary_keeps_smallest_set_reaching_the_mass():
    # probs 0.5 / 0.375 / 0.125 exactly: top_p = 0.875 is met by the top two alone.
    logits = torch.log(torch.tensor([[4.0, 3.0, 1.0]]))
    probs = process_probs(logits, torch.tensor([1.0]), None, torch.tensor([0.875]), None)
    torch.testing.assert_close(probs[0], torch.tensor([4 / 7, 3 / 7, 0.0]))


def test_min_p_one_keeps_exactly_the_tied_maxima():
    logits = torch.tensor([[2.0, 2.0, 1.0, 0.0]])
    probs = process_probs(logits, torch.tensor([1.0]), None, None, torch.tensor([1.0]))
    assert probs[0].tolist() == [0.5, 0.5, 0.0, 0.0]


def test_top_k_mixed_per_row_without_top_p():
    v = 16
    logits = torch.randn(3, v, generator=torch.Generator().manual_seed(4))
    probs = process_probs(logits, torch.ones(3), torch.tensor([2, 5, v]))
    for i, k in enumerate((2, 5, v)):
        support = set(torch.nonzero(probs[i]).flatten().tolist())
        assert support == set(logits[i].topk(k).indices.tolist()), i


def test_top_k_larger_than_vocab_is_off():
    logits = torch.randn(1, 6, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(top_k=100)
    tokens = Sampler(0).sample(logits.expand(500, 6).contiguous(), [row(p) for _ in range(500)]).token_ids
    assert len(set(tokens)) > 3


# ---------------------------------------------------------------- distribution


def test_temperature_sampling_matches_softmax_distribution():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5])
    t, n = 0.7, 30000
    params = SamplingParams(temperature=t)
    tokens = Sampler(1234).sample(logits.expand(n, 6).contiguous(), [row(params) for _ in range(n)]).token_ids
    counts = torch.bincount(torch.tensor(tokens), minlength=6).double()
    expected = torch.softmax(logits.double() / t, 0) * n
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 20.5  # df = 5, p ~ 0.001


def test_seeded_rows_sample_the_same_distribution():
    """Per-row generators must give correct (not just reproducible) samples."""
    logits = torch.tensor([[0.5, 1.5, -0.3, 0.0]])
    p = SamplingParams(temperature=1.0, seed=9)
    gen = make_generator(9)
    sampler = Sampler()
    n = 6000
    tokens = [sampler.sample(logits, [row(p, gen=gen)]).token_ids[0] for _ in range(n)]
    counts = torch.bincount(torch.tensor(tokens), minlength=4).double()
    expected = torch.softmax(logits[0].double(), 0) * n
    assert (((counts - expected) ** 2) / expected).sum().item() < 16.3  # df = 3, p ~ 0.001


# ---------------------------------------------------------------- reproducibility


def _run(batch_specs, steps: int, v: int = 50, sampler_seed: int | None = None) -> dict[str, list[int]]:
    """Decode `steps` tokens for named rows; logits depend only on (name, step)."""
    sampler = Sampler(sampler_seed)
    gens = {name: make_generator(p.seed) if p.seed is not None else None for name, p in batch_specs}
    outs: dict[str, list[int]] = {name: [] for name, _ in batch_specs}
    for step in range(steps):
        rows, logits = [], []
        for name, p in batch_specs:
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{step}".encode()))  # stable across runs
            logits.append(torch.randn(v, generator=g))
            rows.append(row(p, [1, 2], outs[name], gens[name]))
        res = sampler.sample(torch.stack(logits), rows)
        for (name, _), tok in zip(batch_specs, res.token_ids):
            outs[name].append(tok)
    return outs


def test_seeded_row_independent_of_batch_composition_and_order():
    a = SamplingParams(seed=42, top_p=0.9, presence_penalty=0.3)
    b = SamplingParams(seed=7, top_k=5, temperature=0.8)
    alone = _run([("a", a)], 12)
    mixed = _run(
        [("x", SamplingParams()), ("a", a), ("g", SamplingParams(temperature=0)), ("b", b),
         ("y", SamplingParams(min_p=0.1))],
        12, sampler_seed=3,
    )
    reordered = _run([("b", b), ("y", SamplingParams()), ("a", a)], 12, sampler_seed=99)
    assert alone["a"] == mixed["a"] == reordered["a"]
    assert mixed["b"] == reordered["b"]
    assert len(set(alone["a"])) > 3  # actually random, not collapsed to greedy
    other_seed = _run([("a", a.clone(seed=43))], 12)
    assert other_seed["a"] != alone["a"]


def test_unseeded_rows_follow_sampler_seed():
    specs = [("x", SamplingParams()), ("y", SamplingParams(top_k=10))]
    assert _run(specs, 8, sampler_seed=5) == _run(specs, 8, sampler_seed=5)
    assert _run(specs, 8, sampler_seed=5) != _run(specs, 8, sampler_seed=6)


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax_with_chosen_and_top_k():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(4, 64, generator=g)
    specs = [
        row(SamplingParams(logprobs=3, temperature=0.5, top_k=2, repetition_penalty=1.3), [1], [2]),
        row(SamplingParams()),  # did not ask
        row(SamplingParams(logprobs=0, temperature=0, presence_penalty=2.0), [], [int(logits[2].argmax())]),
        row(SamplingParams(logprobs=20, min_p=0.5)),
    ]
    res = Sampler(0).sample(logits, specs)
    raw = torch.log_softmax(logits, dim=-1)
    assert res.logprobs is not None and res.logprobs[1] is None
    for i in (0, 2, 3):
        entry = res.logprobs[i]
        chosen = res.token_ids[i]
        n_top = specs[i].params.logprobs
        assert next(iter(entry)) == chosen  # chosen token first
        top = raw[i].topk(n_top).indices.tolist() if n_top else []
        assert set(entry) == {chosen, *top}
        for tok, lp in entry.items():
            assert lp == pytest.approx(raw[i, tok].item(), abs=1e-6)
    # Row 2: presence penalty moved greedy away from the raw argmax, logprob stays raw.
    assert res.token_ids[2] != int(logits[2].argmax())


def test_no_logprobs_when_nobody_asks():
    res = Sampler(0).sample(torch.randn(2, 10), [row(), row(SamplingParams(temperature=0))])
    assert res.logprobs is None and len(res.token_ids) == 2


# ---------------------------------------------------------------- input checks


def test_bad_logits_shapes_are_rejected():
    s = Sampler()
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        s.sample(torch.zeros(10), [row()])
    with pytest.raises(ValueError, match="rows"):
        s.sample(torch.zeros(2, 10), [row()])
    with pytest.raises(TypeError, match="floating"):
        s.sample(torch.zeros(1, 10, dtype=torch.int64), [row()])
    assert s.sample(torch.zeros(0, 10), []).token_ids == []


def test_penalty_counts_kept_across_steps_equal_rebuilt():
    """A penalised row's count tables live on its SampleRow and grow by the new tokens only; after any
    sequence of steps they equal tables rebuilt from the lists, and so do the sampled tokens."""
    g = torch.Generator().manual_seed(8)
    p = SamplingParams(temperature=0, presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.3)
    kept = row(p, [1, 2, 3], [])
    sampler = Sampler(0)
    for step in range(12):
        logits = torch.randn(1, 16, generator=g)
        fresh = row(p, [1, 2, 3], list(kept.output_ids))  # no state: rebuilt from the lists
        want = sampler.sample(logits, [fresh]).token_ids
        got = sampler.sample(logits, [kept]).token_ids
        assert got == want
        seen, counts, done = kept.penalty
        assert done == len(kept.output_ids)
        assert counts.tolist() == [float(kept.output_ids.count(t)) for t in range(16)]
        assert seen.tolist() == [t in (1, 2, 3) for t in range(16)]
        kept.output_ids.append(got[0] if step % 3 else 5)  # sometimes a token the logits did not pick
    kept.output_ids.append(99)
    with pytest.raises(ValueError, match="out of range"):
        sampler.sample(torch.zeros(1, 16), [kept])
