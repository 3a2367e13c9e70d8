"""Client sampling: distinct, reproducible per (seed, round), and weighted by client size."""
from collections import Counter

import pytest

from fl_lib.fl.sampling import ClientSampler

IDS = [f"spk{i}" for i in range(10)]
SIZES = list(range(1, 11))


@pytest.mark.parametrize("mode", ["uniform", "weighted"])
def test_distinct_clients_within_a_round(mode):
    sampler = ClientSampler(IDS, SIZES, per_round=6, mode=mode, seed=3)
    for r in range(50):
        picked = sampler.sample(r)
        assert len(picked) == 6 and len(set(picked)) == 6 and set(picked) <= set(IDS)


@pytest.mark.parametrize("mode", ["uniform", "weighted"])
def test_deterministic_per_seed_and_round(mode):
    """A resumed run (a fresh sampler, rounds asked out of order) draws what an uninterrupted one did."""
    first = ClientSampler(IDS, SIZES, per_round=3, mode=mode, seed=7)
    rounds = [first.sample(r) for r in range(20)]
    resumed = ClientSampler(IDS, SIZES, per_round=3, mode=mode, seed=7)
    assert [resumed.sample(r) for r in reversed(range(20))] == rounds[::-1]
    other_seed = ClientSampler(IDS, SIZES, per_round=3, mode=mode, seed=8)
    assert [other_seed.sample(r) for r in range(20)] != rounds


def test_rounds_differ():
    sampler = ClientSampler(IDS, SIZES, per_round=3, seed=0)
    draws = {tuple(sampler.sample(r)) for r in range(20)}
    assert len(draws) > 15  # 720 possible ordered triples: repeats are rare


def test_uniform_frequencies_are_flat():
    sampler = ClientSampler(IDS, SIZES, per_round=2, mode="uniform", seed=1)
    counts = Counter(c for r in range(5000) for c in sampler.sample(r))
    assert all(counts[c] / 5000 == pytest.approx(0.2, abs=0.03) for c in IDS)


def test_weighted_frequency_proportional_to_size():
    """One client per round: P(client) = size / total exactly, so frequencies follow the sizes."""
    sampler = ClientSampler(IDS, SIZES, per_round=1, mode="weighted", seed=1)
    rounds = 20000
    counts = Counter(sampler.sample(r)[0] for r in range(rounds))
    total = sum(SIZES)
    for cid, size in zip(IDS, SIZES):
        assert counts[cid] / rounds == pytest.approx(size / total, abs=0.01)


def test_weighted_several_per_round_favours_large_clients():
    """Without replacement the inclusion odds flatten, but larger clients still come more often."""
    sampler = ClientSampler(["s", "m", "l"], [1, 10, 100], per_round=2, mode="weighted", seed=2)
    counts = Counter(c for r in range(3000) for c in sampler.sample(r))
    assert counts["s"] < counts["m"] < counts["l"]
    assert counts["l"] / 3000 > 0.99  # P(l left out) = 1/111·10/110 + 10/111·1/101 ≈ 0.002


@pytest.mark.parametrize("per_round", [0, -1, 11])
def test_clients_per_round_out_of_range(per_round):
    with pytest.raises(ValueError, match=rf"clients_per_round must be between 1 and the number of clients \(10\), got {per_round}"):
        ClientSampler(IDS, SIZES, per_round=per_round)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match=r"sampler must be one of \('uniform', 'weighted', 'poisson'\), got 'by_size'"):
        ClientSampler(IDS, SIZES, per_round=2, mode="by_size")
    with pytest.raises(ValueError, match="unique"):
        ClientSampler(["a", "a", "b"], [1, 1, 1], per_round=2)
    with pytest.raises(ValueError, match="one size each"):
        ClientSampler(["a", "b"], [1], per_round=1)
    with pytest.raises(ValueError, match="size > 0"):
        ClientSampler(["a", "b", "c"], [5, 0, 5], per_round=2, mode="weighted")
