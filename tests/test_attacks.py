"""Forged updates (fl_lib/fl/attacks.py): each attack applied exactly, against its formula and
against byzfl's implementation where it has one, and the attackers logged but hidden from the strategy."""
from __future__ import annotations

import math
from dataclasses import replace
from statistics import NormalDist

import byzfl  # test-only oracle (requirements-test.txt)
import numpy as np
import pytest
import torch

from fl_lib.fl.attacks import Attack, alie_z
from fl_lib.fl.config import AttackConfig, FLConfig
from fl_lib.fl.strategies import ClientResult


def result(cid: str, vector) -> ClientResult:
    v = torch.as_tensor(vector, dtype=torch.float32)
    return ClientResult(cid, {"w": v[:-1].reshape(1, -1), "b": v[-1:]}, num_utts=10, num_frames=1000, train_loss=2.0,
                        grad_mean=0.0, grad_rms=1.0, grad_var=1.0, num_tokens=50)


def flat(r: ClientResult) -> np.ndarray:
    return torch.cat([r.delta["w"].reshape(-1), r.delta["b"]]).double().numpy()


def forge(conf: AttackConfig, honest, own, num_clients=None):
    attack = Attack(conf, seed=5)
    attack.bind(["w", "b"])
    attack.begin_round()
    for i, h in enumerate(honest):
        attack.observe(result(f"h{i}", h))
    return attack.forge(result("a0", own), draw=0, cohort_size=num_clients or len(honest) + conf.per_round)


@pytest.fixture
def honest():
    return np.random.default_rng(0).normal(size=(6, 5))


def test_sign_flip_and_scaling_are_exact(honest):
    own = [1.0, -2.0, 0.5, 3.0, -1.0]
    assert flat(forge(AttackConfig(name="sign_flip", per_round=1), honest, own)).tolist() == [-1.0, 2.0, -0.5, -3.0, 1.0]
    scaled = forge(AttackConfig(name="scale", per_round=1, scale=100.0), honest, own)
    assert flat(scaled).tolist() == [100.0, -200.0, 50.0, 300.0, -100.0]
    # the statistics a strategy reads are the forged Δ's; the loss and sizes stay the attacker's own
    d = np.array([100.0, -200.0, 50.0, 300.0, -100.0])
    assert scaled.grad_rms == pytest.approx(math.sqrt((d**2).mean())) and scaled.grad_mean == pytest.approx(d.mean())
    assert scaled.train_loss == 2.0 and scaled.num_utts == 10


def test_alie_matches_its_formula_and_byzfl(honest):
    f, k = 2, 8
    forged = flat(forge(AttackConfig(name="alie", per_round=f), honest, np.zeros(5), num_clients=k))
    z = alie_z(k, f)  # s = floor(8/2 + 1) - 2 = 3; z = Φ⁻¹(5/8)
    assert z == pytest.approx(0.318639, abs=1e-6)
    expected = honest.mean(0) - z * honest.std(0, ddof=1)
    assert forged == pytest.approx(expected, abs=1e-6)
    assert forged == pytest.approx(byzfl.ALittleIsEnough(tau=-z)(honest), abs=1e-6)
    given = flat(forge(AttackConfig(name="alie", per_round=f, z=1.5), honest, np.zeros(5)))
    assert given == pytest.approx(honest.mean(0) - 1.5 * honest.std(0, ddof=1), abs=1e-6)


def test_ipm_matches_byzfl_and_gaussian_has_the_honest_mean_norm(honest):
    forged = flat(forge(AttackConfig(name="ipm", per_round=1, epsilon=0.5), honest, np.zeros(5)))
    assert forged == pytest.approx(-0.5 * honest.mean(0), abs=1e-6)  # −εμ
    assert forged == pytest.approx(byzfl.InnerProductManipulation(tau=0.5)(honest), abs=1e-6)
    noise = flat(forge(AttackConfig(name="gaussian", per_round=1), honest, np.zeros(5)))
    assert np.linalg.norm(noise) == pytest.approx(np.linalg.norm(honest, axis=1).mean(), rel=1e-6)
    again = flat(forge(AttackConfig(name="gaussian", per_round=1), honest, np.zeros(5)))
    assert np.array_equal(noise, again)  # seeded by (seed, round, client)


def paper_bisection(honest: np.ndarray, p: np.ndarray, rule: str, gamma_init=10.0, tau=1e-9) -> float:
    """Shejwalkar & Houmansadr's Algorithm 1 (the step rule of their released code, γ_init 10), an
    oracle independent of the closed form: move γ by halving steps, keeping the last γ that
    satisfied the rule. It searches (0, 2·γ_init) only. The min-sum bound is the paper's, the
    largest honest sum of squared distances; their released code compares with the smallest."""
    dist = ((honest[:, None] - honest[None]) ** 2).sum(-1)
    bound = dist.max() if rule == "min_max" else dist.sum(1).max()

    def ok(g):
        d = ((honest.mean(0) + g * p - honest) ** 2).sum(1)
        return (d.max() if rule == "min_max" else d.sum()) <= bound

    gamma, step, succ = gamma_init, gamma_init, 0.0
    while abs(succ - gamma) > tau:
        if ok(gamma):
            succ, gamma = gamma, gamma + step / 2
        else:
            gamma -= step / 2
        step /= 2
    return succ


@pytest.mark.parametrize("rule", ["min_max", "min_sum"])
@pytest.mark.parametrize("direction", ["std", "unit", "sign"])
def test_min_max_and_min_sum_sit_on_their_bound_and_match_the_paper_s_bisection(honest, rule, direction):
    mean = honest.mean(0)
    p = {"std": -honest.std(0, ddof=1), "unit": -mean / np.linalg.norm(mean), "sign": -np.sign(mean)}[direction]
    forged = flat(forge(AttackConfig(name=rule, per_round=2, direction=direction), honest, np.zeros(5)))
    gamma = np.dot(forged - mean, p) / np.dot(p, p)
    assert forged == pytest.approx(mean + gamma * p, abs=1e-6)  # on the ray μ + γp, γ > 0
    assert 0.1 < gamma < 19  # inside the bisection's search range
    assert gamma == pytest.approx(paper_bisection(honest, p, rule), rel=1e-4)
    # the forged update is exactly as far from the honest ones as the rule allows
    d_forged = ((forged - honest) ** 2).sum(1)
    dist = ((honest[:, None] - honest[None]) ** 2).sum(-1)
    if rule == "min_max":
        assert d_forged.max() == pytest.approx(dist.max(), rel=1e-5)
    else:
        assert d_forged.sum() == pytest.approx(dist.sum(1).max(), rel=1e-5)


@pytest.mark.parametrize("rule", ["min_max", "min_sum"])
def test_min_max_and_min_sum_push_against_the_standard_deviation_unless_told_otherwise(honest, rule):
    unset = flat(forge(AttackConfig(name=rule, per_round=1), honest, np.zeros(5)))
    assert unset == pytest.approx(flat(forge(AttackConfig(name=rule, per_round=1, direction="std"), honest, np.zeros(5))))
    assert unset != pytest.approx(flat(forge(AttackConfig(name=rule, per_round=1, direction="sign"), honest, np.zeros(5))))


@pytest.mark.parametrize("name,f,needed", [("sign_flip", 3, 3), ("scale", 3, 3), ("gaussian", 3, 4), ("ipm", 3, 4),
                                           ("alie", 3, 5), ("min_max", 3, 5), ("min_sum", 3, 5), ("none", 0, 1)])
def test_a_round_needs_the_attackers_and_the_honest_updates_they_forge_from(name, f, needed):
    """README: f + 1 usable clients for gaussian and IPM (a mean), f + 2 for ALIE, min-max and min-sum (a spread)."""
    extra = {"scale": {"scale": 10.0}, "ipm": {"epsilon": 0.5}}.get(name, {})
    assert Attack(AttackConfig(name=name, per_round=f, **extra), seed=0).min_clients() == needed


def test_min_max_keeps_its_bound_for_many_close_updates_far_from_the_origin():
    """30 honest updates 1e-3 apart around 1e5: torch.cdist's matrix-product form (used from 25 rows on)
    loses their distances to cancellation (98 % error); the forged update must still sit on its bound.
    float64 updates (a float64 model's): float32 cannot hold such steps at that scale."""
    honest = 1e5 + 1e-3 * np.random.default_rng(1).normal(size=(30, 10))
    attack = Attack(AttackConfig(name="min_max", per_round=1), seed=5)
    attack.bind(["w"])
    attack.begin_round()
    stats = dict(num_utts=10, num_frames=1000, train_loss=2.0, grad_mean=0.0, grad_rms=1.0, grad_var=1.0, num_tokens=50)
    for i, h in enumerate(honest):
        attack.observe(ClientResult(f"h{i}", {"w": torch.as_tensor(h)}, **stats))
    own = ClientResult("a0", {"w": torch.zeros(10, dtype=torch.float64)}, **stats)
    forged = attack.forge(own, draw=0, cohort_size=31).delta["w"].numpy()
    dist = ((honest[:, None] - honest[None]) ** 2).sum(-1)
    assert ((forged - honest) ** 2).sum(1).max() == pytest.approx(dist.max(), rel=1e-6)


def test_min_max_and_min_sum_refuse_a_k_whose_kept_updates_exceed_the_memory_limit():
    attack = Attack(AttackConfig(name="min_sum", per_round=1, memory_limit_mb=100.0), seed=0)
    attack.check_memory(4, 1_000_000)  # 3 honest x 3 copies x 8 MB = 68.7 MB
    with pytest.raises(ValueError, match=r"K=4 clients \(f=1\) of 2,000,000 floats need about 137 MB.*memory_limit_mb=100"):
        attack.check_memory(4, 2_000_000)
    with pytest.raises(ValueError, match="K=2000 clients"):  # the default limit, 4096 MB
        Attack(AttackConfig(name="min_max", per_round=1), seed=0).check_memory(2_000, 100_000)
    Attack(AttackConfig(name="alie", per_round=1), seed=0).check_memory(2_000, 100_000)  # sums only: nothing kept
    with pytest.raises(ValueError, match="does not use: memory_limit_mb"):
        AttackConfig(name="alie", per_round=1, memory_limit_mb=10.0)


def test_min_max_with_identical_honest_updates_sends_their_mean():
    same = np.ones((3, 5))
    assert flat(forge(AttackConfig(name="min_max", per_round=1), same, np.zeros(5))).tolist() == [1.0] * 5


def test_min_max_aligns_updates_whose_entries_come_in_another_order(honest):
    """Flower's replies may list a state's entries in any order: each is flattened by name."""
    attack = Attack(AttackConfig(name="min_sum", per_round=2), seed=5)
    attack.bind(["w", "b"])
    attack.begin_round()
    for i, h in enumerate(honest):
        r = result(f"h{i}", h)
        if i % 2:
            r = replace(r, delta={"b": r.delta["b"], "w": r.delta["w"]})
        attack.observe(r)
    mixed = attack.forge(result("a0", np.zeros(5)), draw=0, cohort_size=8)
    again = attack.forge(replace(result("a1", np.zeros(5)), delta={"b": torch.zeros(1), "w": torch.zeros(1, 4)}), 0, 8)
    expected = flat(forge(AttackConfig(name="min_sum", per_round=2), honest, np.zeros(5)))
    assert flat(mixed).tolist() == expected.tolist()
    assert list(again.delta) == ["b", "w"] and flat(again).tolist() == expected.tolist()  # colluders: the same update


def test_attackers_are_f_of_the_sampled_clients_seeded_by_round():
    attack = Attack(AttackConfig(name="sign_flip", per_round=2), seed=5)
    sampled = [f"c{i}" for i in range(8)]
    picks = [attack.choose(sampled, draw) for draw in range(20)]
    assert all(len(p) == 2 and set(p) <= set(sampled) for p in picks)
    assert picks == [Attack(AttackConfig(name="sign_flip", per_round=2), seed=5).choose(sampled, d) for d in range(20)]
    assert len({tuple(p) for p in picks}) > 5  # not the same two every round
    assert Attack(AttackConfig(), seed=5).choose(sampled, 0) == []


def test_attack_config_refuses_unused_and_missing_keys():
    with pytest.raises(ValueError, match="does not use: scale"):
        AttackConfig(name="sign_flip", per_round=1, scale=10.0)
    with pytest.raises(ValueError, match="needs attack.epsilon"):
        AttackConfig(name="ipm", per_round=1)
    with pytest.raises(ValueError, match="needs attack.per_round >= 1"):
        AttackConfig(name="scale", scale=10.0)
    with pytest.raises(ValueError, match="does not use: per_round"):
        AttackConfig(per_round=2)
    with pytest.raises(ValueError, match="exceeds clients_per_round=4"):
        FLConfig.from_yaml(None, ["clients_per_round=4", "attack.name=sign_flip", "attack.per_round=5"])
    with pytest.raises(ValueError, match="needs at least 2, round 1 has 1"):
        forge(AttackConfig(name="alie", per_round=1), [[1.0, 2.0]], [0.0, 0.0])
    with pytest.raises(ValueError, match="needs at least 2, round 1 has 1"):
        forge(AttackConfig(name="min_sum", per_round=1), [[1.0, 2.0]], [0.0, 0.0])
    with pytest.raises(ValueError, match="does not use: direction"):
        AttackConfig(name="alie", per_round=1, direction="std")
    with pytest.raises(ValueError, match="attack.direction must be one of"):
        AttackConfig(name="min_max", per_round=1, direction="random")


def test_alie_s_z_max_needs_at_most_half_of_the_cohort_attacking():
    assert alie_z(8, 4) == pytest.approx(NormalDist().inv_cdf(7 / 8))  # s = 5 − 4 = 1
    with pytest.raises(ValueError, match="needs f <= K/2"):
        alie_z(8, 5)
    with pytest.raises(ValueError, match="needs attack.per_round <= clients_per_round / 2"):
        FLConfig.from_yaml(None, ["clients_per_round=8", "attack.name=alie", "attack.per_round=5"])
    FLConfig.from_yaml(None, ["clients_per_round=8", "attack.name=alie", "attack.per_round=5", "attack.z=1.0"])  # z given: fine
    assert Attack(AttackConfig(name="alie", per_round=3), seed=0).min_clients() == 5  # 3 attackers and 2 honest to forge from
