"""The robust aggregation rules: against byzfl (an independent implementation of the same rules),
against their formulas on hand-computed values, and at and past their breakdown points."""
from __future__ import annotations

import math

import byzfl  # test-only: an independent implementation of the same rules (requirements-test.txt)
import numpy as np
import pytest
import torch

from fl_lib.fl.config import StrategyConfig
from fl_lib.fl.strategies import ClientResult, build_strategy
from fl_lib.fl.strategies.robust import CenteredClipping, GeometricMedian, Median, MultiKrum, NormBounding, Rows, TrimmedMean


def result(cid: str, vector, shape=None) -> ClientResult:
    """A client whose Δ is `vector`, split into a weight matrix and a bias as a model's state would be."""
    v = torch.as_tensor(vector, dtype=torch.float32)
    delta = {"w": v[:-1].reshape(shape or (1, -1)), "b": v[-1:]}
    return ClientResult(cid, delta, num_utts=10, num_frames=1000, train_loss=1.0, grad_mean=0.0, grad_rms=1.0, grad_var=1.0, num_tokens=50)


def run(strategy, rows, ids=None):
    """One round of `strategy` over client updates `rows` (K×d); the flat aggregate and the weights."""
    strategy.begin_round()
    ids = ids or [f"c{i}" for i in range(len(rows))]
    for cid, row in zip(ids, rows):
        strategy.add(result(cid, row))
    agg = strategy.aggregate()
    return torch.cat([agg.pseudo_grad["w"].reshape(-1), agg.pseudo_grad["b"]]), agg.weights


@pytest.fixture
def updates():
    g = np.random.default_rng(0)
    return g.normal(size=(9, 6)).astype(np.float32)


# -- against byzfl ------------------------------------------------------------------
@pytest.mark.parametrize("k", [8, 9])
def test_median_and_trimmed_mean_match_byzfl(updates, k):
    x = updates[:k]
    assert torch.allclose(run(Median(), x)[0], torch.from_numpy(byzfl.Median()(x)), atol=1e-6)
    # trim_fraction 0.25: floor(0.25 K) = 2 values dropped at each end, byzfl's f = 2
    assert torch.allclose(run(TrimmedMean(0.25), x)[0], torch.from_numpy(byzfl.TrMean(2)(x)), atol=1e-6)


def test_multi_krum_matches_byzfl_with_its_neighbour_count(updates):
    """byzfl's MultiKrum(f') scores over the n - f' - 1 nearest rows and keeps n - f' rows; Blanchard et al.'s
    Krum (ours) scores over K - f - 2: ours with f = f' - 1 and m = K - f - 1 is byzfl's f'."""
    x = updates.copy()
    x[2] += 5.0  # one outlier, so the selection is not a tie
    ours = run(MultiKrum(num_byzantine=1, num_selected=9 - 2), x)[0]
    assert torch.allclose(ours, torch.from_numpy(byzfl.MultiKrum(2)(x)), atol=1e-6)


def test_geometric_median_matches_byzfl_at_convergence(updates):
    ours = run(GeometricMedian(tolerance=1e-10, max_iterations=10_000), updates)[0]
    theirs = byzfl.GeometricMedian(nu=1e-9, T=10_000)(updates.astype(np.float64))
    assert torch.allclose(ours.double(), torch.from_numpy(theirs), atol=1e-5)


def test_centered_clipping_matches_byzfl_over_two_rounds(updates):
    """Both start from zero and centre each later round on the previous aggregate."""
    ours, theirs = CenteredClipping(clip_radius=1.0, clip_iterations=3), byzfl.CenteredClipping(L=3, tau=1.0)
    for x in (updates, updates[::-1] + 0.5):
        x = np.ascontiguousarray(x, dtype=np.float64)
        assert torch.allclose(run(ours, x)[0].double(), torch.from_numpy(theirs(x)), atol=1e-5)


# -- against the formulas -------------------------------------------------------------
def test_median_on_odd_and_even_k_and_each_client_s_share():
    odd = [[1.0, 10.0], [3.0, 30.0], [2.0, -5.0]]
    agg, w = run(Median(), odd)
    assert agg.tolist() == [2.0, 10.0]
    assert w == pytest.approx({"c0": 0.5, "c1": 0.0, "c2": 0.5})  # c2 is the median of coordinate 0, c0 of 1
    even = [[1.0, 0.0], [4.0, 8.0], [2.0, 2.0], [100.0, 4.0]]
    agg, w = run(Median(), even)
    assert agg.tolist() == [3.0, 3.0]  # (2 + 4) / 2 and (2 + 4) / 2
    assert w == pytest.approx({"c0": 0.0, "c1": 0.25, "c2": 0.5, "c3": 0.25})


def test_trimmed_mean_drops_floor_beta_k_at_each_end():
    rows = [[1.0, 6.0], [2.0, 5.0], [3.0, 4.0], [4.0, 3.0], [50.0, -9.0]]
    agg, w = run(TrimmedMean(0.2), rows)  # floor(0.2 * 5) = 1 per side
    assert agg.tolist() == pytest.approx([3.0, 4.0])  # mean(2, 3, 4), mean(3, 4, 5)
    assert w["c4"] == 0.0 and w["c1"] == pytest.approx(1 / 3)
    agg, _ = run(TrimmedMean(0.19), rows)  # floor(0.95) = 0: the plain mean
    assert agg.tolist() == pytest.approx([12.0, 1.8])


def test_krum_scores_hand_computed():
    # 1-D points 0, 1, 3, 10 (and a zero bias): K = 4, f = 1, so each row's K - f - 2 = 1 nearest other row
    rows = [[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [10.0, 0.0]]
    krum = MultiKrum(num_byzantine=1, num_selected=2)
    assert krum.scores(Rows(list(torch.tensor(rows)))).tolist() == [1.0, 1.0, 4.0, 49.0]
    agg, w = run(krum, rows)
    assert agg.tolist() == [0.5, 0.0] and w == {"c0": 0.5, "c1": 0.5, "c2": 0.0, "c3": 0.0}
    with pytest.raises(ValueError, match="K > f \\+ 2"):
        run(MultiKrum(num_byzantine=2), rows)
    # m defaults to K − f = 3: every row but the one of worst score (10), each at 1/3
    agg, w = run(MultiKrum(num_byzantine=1), rows)
    assert agg.tolist() == pytest.approx([4 / 3, 0.0]) and w == pytest.approx({"c0": 1 / 3, "c1": 1 / 3, "c2": 1 / 3, "c3": 0.0})


def test_weiszfeld_reaches_the_brute_force_minimiser_of_summed_distances():
    pts = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 3.0], [5.0, 5.0], [1.0, 1.5]])
    gm = GeometricMedian(tolerance=1e-12, max_iterations=5000)
    z, shares = gm.combine(Rows(list(torch.tensor(pts, dtype=torch.float32))))
    z = z.double().numpy()

    def argmin_on_grid(xs, ys):
        grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
        costs = np.linalg.norm(grid[:, None, :] - pts[None], axis=2).sum(1)
        return grid[costs.argmin()], costs.min()

    # brute force: a 0.01 grid over the points' box, then a 1e-4 grid around its best point
    coarse, _ = argmin_on_grid(np.arange(0, 5.0001, 0.01), np.arange(0, 5.0001, 0.01))
    fine = np.arange(-0.01, 0.01001, 1e-4)
    best, best_cost = argmin_on_grid(coarse[0] + fine, coarse[1] + fine)
    assert np.allclose(z, best, atol=2e-4)
    assert np.linalg.norm(pts - z, axis=1).sum() <= best_cost + 1e-6
    assert gm.last_metrics["weiszfeld_converged"]
    # the weight logged per client: its final Weiszfeld weight 1 / max(ν, ‖x_i − z‖), normalized
    inv = 1.0 / np.maximum(np.linalg.norm(pts - z, axis=1), 1e-6)
    assert shares.numpy() == pytest.approx(inv / inv.sum(), rel=1e-5)


def test_centered_clipping_follows_its_recursion():
    """τ = 1, two iterations from v = 0, 1-D: v1 = mean(clip(x - 0)), v2 = v1 + mean(clip(x - v1)); the next round starts at v2."""
    rows = [[0.5, 0.0], [3.0, 0.0], [-4.0, 0.0]]
    cc = CenteredClipping(clip_radius=1.0, clip_iterations=2)
    agg, w = run(cc, rows)
    clip = lambda y: y * min(1.0, 1.0 / abs(y)) if y else 0.0  # noqa: E731
    v1 = sum(clip(r[0]) for r in rows) / 3  # (0.5 + 1 - 1) / 3
    v2 = v1 + sum(clip(r[0] - v1) for r in rows) / 3
    assert agg[0].item() == pytest.approx(v2, abs=1e-6)
    factors = [sum(min(1.0, 1.0 / abs(r[0] - v)) for v in (0.0, v1)) for r in rows]
    assert [w[f"c{i}"] for i in range(3)] == pytest.approx([f / sum(factors) for f in factors])
    v3 = v2 + sum(clip(r[0] - v2) for r in [[v2 + 0.25, 0.0]] * 3) / 3  # round 2 is centred on v2
    v3 = v3 + sum(clip(r[0] - v3) for r in [[v2 + 0.25, 0.0]] * 3) / 3
    assert run(cc, [[v2 + 0.25, 0.0]] * 3)[0][0].item() == pytest.approx(v3, abs=1e-6)


def test_norm_bounding_scales_each_update_to_the_median_norm():
    rows = [[3.0, 4.0], [0.0, 1.0], [30.0, 40.0]]  # norms 5, 1, 50: the bound is 5
    agg, w = run(NormBounding(), rows)
    assert agg.tolist() == pytest.approx([(3 + 0 + 3) / 3, (4 + 1 + 4) / 3])
    assert w == pytest.approx({"c0": 1 / 2.1, "c1": 1 / 2.1, "c2": 0.1 / 2.1})


def test_bucketing_averages_random_buckets_and_splits_their_share():
    from fl_lib.fl.sampling import derive_seed

    rows = [[float(i), 2.0 * i] for i in range(6)]  # both coordinates in the same order: one middle bucket
    median = Median(bucket_size=2, seed=3)
    middles = []
    for rnd in (0, 1):  # a new partition each round: the permutation is seeded by (seed, round)
        agg, w = run(median, rows)
        perm = torch.randperm(6, generator=torch.Generator().manual_seed(derive_seed(3, "buckets", rnd))).tolist()
        buckets = sorted((perm[i : i + 2] for i in (0, 2, 4)), key=sum)
        middle = buckets[1]  # the median of the 3 bucket means, which is the middle bucket's mean
        assert agg.tolist() == pytest.approx([sum(middle) / 2, sum(middle)])
        assert {c: v for c, v in w.items() if v > 0} == pytest.approx({f"c{middle[0]}": 0.5, f"c{middle[1]}": 0.5})
        middles.append(sorted(middle))
    assert middles[0] != middles[1]  # else the second round could not tell a partition reused from one redrawn


def test_the_result_does_not_depend_on_arrival_order(updates):
    forward = run(GeometricMedian(), updates)
    backward = run(GeometricMedian(), updates[::-1], ids=[f"c{i}" for i in range(8, -1, -1)])
    assert torch.equal(forward[0], backward[0]) and forward[1] == backward[1]


# -- breakdown --------------------------------------------------------------------
def honest_and_attackers(f: int, k: int = 9, scale: float = 100.0):
    g = np.random.default_rng(1)
    honest = g.normal(size=(k - f, 6)).astype(np.float32)
    attackers = -scale * honest[:f]  # scaled sign flips of honest updates
    return honest, np.concatenate([honest, attackers])


@pytest.mark.parametrize("rule, bound", [
    (lambda: Median(), 4),  # K = 9: the median holds while attackers are fewer than half
    (lambda: TrimmedMean(0.34), 3),  # trims 3 per side: holds for f <= 3
    (lambda: MultiKrum(num_byzantine=3), 3),  # K > 2f + 2
])
def test_below_its_bound_a_rule_stays_within_the_honest_range_and_above_it_breaks(rule, bound):
    """Below the bound, every coordinate of the aggregate lies within the honest updates' range (the
    guarantee of the coordinate-wise rules, and of Krum's selection when attackers are far). One attacker
    past the bound, the scaled sign flips carry the aggregate out of that range: the documented failure."""
    honest, x = honest_and_attackers(bound)
    agg = run(rule(), x)[0].numpy()
    assert (agg >= honest.min(0) - 1e-6).all() and (agg <= honest.max(0) + 1e-6).all()
    honest, x = honest_and_attackers(bound + 1)
    if isinstance(rule(), MultiKrum):  # f + 1 attackers: Krum's count assumption fails and it keeps some of them
        agg = run(MultiKrum(num_byzantine=bound, num_selected=9 - bound), x)[0].numpy()
    else:
        agg = run(rule(), x)[0].numpy()
    outside = (agg < honest.min(0) - 1e-6) | (agg > honest.max(0) + 1e-6)
    assert outside.any()


def test_fedavg_is_carried_away_by_one_scaled_attacker():
    """The negative control of the breakdown test: FedAvg's mean has no bound at all."""
    from fl_lib.fl.strategies import FedAvg

    honest, x = honest_and_attackers(1)
    agg = run(FedAvg(weight_by="uniform"), x)[0].numpy()
    assert agg == pytest.approx(x.mean(0), abs=1e-5)
    assert ((agg < honest.min(0)) | (agg > honest.max(0))).any()


# -- configuration and memory --------------------------------------------------------
def test_build_strategy_takes_each_rule_s_keys_and_refuses_the_others():
    s = build_strategy(StrategyConfig(name="krum", num_byzantine=2, bucket_size=2, memory_limit_mb=100.0))
    assert isinstance(s, MultiKrum) and s.f == 2 and s.bucket_size == 2 and s.memory_limit_mb == 100.0
    with pytest.raises(ValueError, match="does not use: clip_radius"):
        build_strategy(StrategyConfig(name="median", clip_radius=1.0))
    with pytest.raises(ValueError, match="does not use: weight_by"):
        build_strategy(StrategyConfig(name="geometric_median", weight_by="num_utts"))
    with pytest.raises(ValueError, match="needs 'trim_fraction'"):
        build_strategy(StrategyConfig(name="trimmed_mean"))
    with pytest.raises(ValueError, match="does not use: bucket_size"):
        build_strategy(StrategyConfig(name="fedavg", bucket_size=2))
    with pytest.raises(ValueError, match="trim_fraction must be in"):
        build_strategy(StrategyConfig(name="trimmed_mean", trim_fraction=0.5))


def test_memory_is_stated_in_k_and_a_k_above_the_limit_is_refused():
    median = Median(memory_limit_mb=100.0)
    assert median.memory_bytes(8, 1_000_000) == 8 * 1_000_000 * 4  # the K rows, float32
    assert Median(bucket_size=3).memory_bytes(8, 1000) == (8 + 3) * 1000 * 4  # and the ceil(8/3) bucket means
    median.check_memory(3, 8_000_000)  # 91.6 MB
    with pytest.raises(ValueError, match=r"K=4 clients of 8,000,000 floats need 122 MB, above strategy.memory_limit_mb=100"):
        median.check_memory(4, 8_000_000)
    default = build_strategy(StrategyConfig(name="median"))  # memory_limit_mb unset: 4096 MB
    default.check_memory(8, 4096 * 2**20 // 32)  # K·d·4 = 4096 MB exactly
    with pytest.raises(ValueError, match=r"above strategy.memory_limit_mb=4096\."):
        default.check_memory(8, 4096 * 2**20 // 32 + 1)


def test_pairwise_distances_of_many_close_rows_far_from_the_origin_are_exact():
    """30 rows 1e-3 apart around 1e5 (Krum's scores are sums of such distances): the matrix-product
    form of torch.cdist, which it uses from 25 rows on, is 98 % off here. Such rows need float64 (a
    float64 model's Δ): float32 cannot hold 1e-3 steps at 1e5, and float32 rows, which the rules
    take in float64, are exact to 1e-16 in either form at that scale."""
    from fl_lib.fl.strategies.robust import Rows

    x = 1e5 + 1e-3 * torch.randn(30, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = ((x[:, None] - x[None]) ** 2).sum(-1)
    got = Rows(list(x)).pairwise_sq_distances()
    assert float((got - exact).abs().max() / exact.max()) < 1e-9


def test_a_client_has_no_score_of_its_own():
    with pytest.raises(TypeError, match="no score of its own"):
        Median().score(result("c0", [1.0, 2.0]))
    assert math.isclose(sum(run(Median(), [[1.0, 2.0], [3.0, 1.0]])[1].values()), 1.0)


def test_column_blocks_change_nothing(updates, monkeypatch):
    """The rules work on blocks of CHUNK coordinates; blocks of 4 over 6 coordinates (a full and a
    partial block) give what one block gives."""
    from fl_lib.fl.strategies import robust

    rules = [Median, lambda: TrimmedMean(0.25), lambda: MultiKrum(num_byzantine=1), GeometricMedian,
             lambda: CenteredClipping(clip_radius=1.0, clip_iterations=2), NormBounding]
    whole = [run(rule(), updates) for rule in rules]
    monkeypatch.setattr(robust, "CHUNK", 4)
    for rule, (agg, weights) in zip(rules, whole):
        blocked, blocked_weights = run(rule(), updates)
        assert torch.allclose(blocked, agg, atol=1e-6) and blocked_weights == pytest.approx(weights)
