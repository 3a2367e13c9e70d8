"""Client-level DP (fl_lib/fl/privacy.py): clipping on hand values, the noise's measured spread,
the accountant against the exact Gaussian mechanism, calibration and refusals."""
from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from fl_lib.fl.config import FLConfig
from fl_lib.fl.privacy import ClientDP, calibrate_sigma, epsilon
from fl_lib.fl.sampling import derive_seed
from fl_lib.fl.strategies import Aggregate, ClientResult

DP = ["strategy.weight_by=uniform", "clients_per_round=8"]


def client_dp(*overrides, num_clients=64) -> ClientDP:
    conf = FLConfig.from_yaml(None, [*DP, *overrides])
    return ClientDP(conf.privacy, conf, num_clients, seed=3)


def result(delta: dict) -> ClientResult:
    return ClientResult("c0", {k: torch.tensor(v) for k, v in delta.items()}, num_utts=5, num_frames=500, train_loss=1.0,
                        grad_mean=0.0, grad_rms=1.0, grad_var=1.0, num_tokens=20)


def test_clipping_whole_model_and_per_layer_on_hand_values():
    dp = client_dp("privacy.clip=6.5", "privacy.noise_multiplier=1.0")
    dp.begin_round()
    out = dp.bound(result({"w": [3.0, 4.0], "b": [12.0]}))  # ‖Δ‖ = 13: scaled by 6.5 / 13
    assert out.delta["w"].tolist() == [1.5, 2.0] and out.delta["b"].tolist() == [6.0]
    out = dp.bound(result({"w": [0.3, 0.4], "b": [1.2]}))  # ‖Δ‖ = 1.3 < 6.5: unchanged
    assert out.delta["w"].tolist() == pytest.approx([0.3, 0.4]) and out.delta["b"].tolist() == pytest.approx([1.2])
    assert dp.report(1)["clipped_fraction"] == 0.5
    layer = client_dp("privacy.clip=6.5", "privacy.noise_multiplier=1.0", "privacy.per_layer=true")
    layer.begin_round()
    out = layer.bound(result({"w": [3.0, 4.0], "b": [1.0]}))  # each tensor to 6.5 / √2 = 4.596: w shrinks, b stays
    bound = 6.5 / math.sqrt(2)
    assert out.delta["w"].tolist() == pytest.approx([3.0 * bound / 5, 4.0 * bound / 5]) and out.delta["b"].tolist() == [1.0]
    # counted by the whole norm (√26 < 6.5: not clipped, although w was), so that the adaptive clip
    # tracks the update's norm and does not climb whenever any one of L tensors exceeds C/√L
    layer.bound(result({"w": [6.0, 8.0], "b": [1.0]}))  # ‖Δ‖ = √101 > 6.5: clipped
    assert layer.report(1)["clipped_fraction"] == 0.5


def test_noise_has_std_sigma_clip_over_k_and_is_the_round_s_own():
    dp = client_dp("privacy.clip=2.0", "privacy.noise_multiplier=0.75")
    zero = Aggregate({"w": torch.zeros(1000, 1000)}, {"c0": 1.0})
    noised = dp.privatize(zero, num_used=8, draw=4, like={}).pseudo_grad["w"]
    # std σ·C / K = 0.75 · 2 / 8 = 0.1875; over 10⁶ draws the sample std is within 0.3 % (5 standard errors)
    assert float(noised.std()) == pytest.approx(0.1875, rel=3e-3) and abs(float(noised.mean())) < 1e-3
    assert torch.equal(noised, dp.privatize(zero, num_used=8, draw=4, like={}).pseudo_grad["w"])  # seeded by round
    assert not torch.equal(noised, dp.privatize(zero, num_used=8, draw=5, like={}).pseudo_grad["w"])
    # the mean of n clipped Δ goes back to their sum, and the denominator is the fixed K, not n
    mean = Aggregate({"w": torch.full((3,), 0.5)}, {"c0": 0.5, "c1": 0.5})
    g = torch.Generator().manual_seed(derive_seed(3, "dp_noise", 0))
    expected = (torch.full((3,), 0.5) * 2 + torch.randn(3, generator=g) * 1.5) / 8
    got = dp.privatize(mean, num_used=2, draw=0, like={})
    assert torch.allclose(got.pseudo_grad["w"], expected) and got.weights == {"c0": 0.125, "c1": 0.125}


def test_a_running_variance_noised_below_zero_is_set_to_zero_and_the_model_is_finite_again():
    """A BatchNorm's running variance noised below 0 makes its eval-mode output NaN (as the σ = 0.03
    tuning runs' dev loss was); projected to 0 it is finite."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["1.running_var"] = torch.tensor([0.5, -0.2, 1.0, -1e-3])
    model.load_state_dict(state)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert torch.isnan(model.eval()(x)).any()
    dp = client_dp("privacy.clip=1.0", "privacy.noise_multiplier=1.0")
    dp.project(state)
    assert state["1.running_var"].tolist() == [0.5, 0.0, 1.0, 0.0] and dp.report(1)["clamped_running_var"] == 2
    model.load_state_dict(state)
    assert torch.isfinite(model.eval()(x)).all()


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """ε of a Gaussian mechanism with sensitivity/std ratio μ, from its exact privacy profile
    (Balle & Wang, ICML 2018, Theorem 8): δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)."""
    profile = lambda eps: norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta  # noqa: E731
    return brentq(profile, 0.0, 100.0)


def test_the_ledger_against_the_exact_gaussian_mechanism_when_every_client_trains():
    """K = N: no sampling, so T rounds compose to one Gaussian with μ = 2√T/σ (replace-one: sensitivity 2C,
    std σC). The RDP accountant's ε is an upper bound of that exact ε, and a tight one."""
    sigma, rounds, delta = 4.0, 100, 1e-5
    exact = exact_gaussian_epsilon(2 * math.sqrt(rounds) / sigma, delta)
    rdp = epsilon(sigma, 16, 16, rounds, delta)
    assert exact_gaussian_epsilon(1.0, norm.cdf(0.5) - norm.cdf(-0.5) - 1e-12) == pytest.approx(0.0, abs=1e-6)  # δ(0) by hand
    assert exact <= rdp <= 1.15 * exact
    # the library's own computation, called directly
    import dp_accounting

    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.GaussianDpEvent(sigma / 2 / math.sqrt(rounds)))
    assert rdp == pytest.approx(acc.get_epsilon(delta), rel=1e-6)
    # sampling 8 of 64 spends less
    assert epsilon(sigma, 64, 8, rounds, delta) < 0.5 * rdp


@pytest.mark.parametrize("sampler", ["uniform", "poisson"])
def test_the_rdp_ledger_of_t_rounds_is_the_accountants_own_composition_and_one_round_is_computed_once(sampler):
    """ε after T rounds, from one round's RDP scaled by T, equals dp-accounting composing the
    T-fold event itself; 40 round counts compute the round's RDP once."""
    import dp_accounting

    from fl_lib.fl.privacy import make_accountant, one_round_rdp, round_event

    one_round_rdp.cache_clear()
    epsilon.cache_clear()
    sigma, delta = 0.7, 1e-6
    for rounds in (1, 7, 250):
        acc = make_accountant(sampler, "rdp")
        acc.compose(dp_accounting.SelfComposedDpEvent(round_event(sigma, 64, 8, sampler), rounds))
        assert epsilon(sigma, 64, 8, rounds, delta, sampler, "rdp") == pytest.approx(acc.get_epsilon(delta), rel=1e-12)
    for rounds in range(300, 340):
        epsilon(sigma, 64, 8, rounds, delta, sampler, "rdp")
    assert one_round_rdp.cache_info().misses == 1


def test_target_epsilon_solves_sigma_and_an_impossible_target_is_refused():
    delta = 64 ** -1.1
    sigma = calibrate_sigma(3.0, 64, 8, 100, delta)
    assert epsilon(sigma, 64, 8, 100, delta) <= 3.0 < epsilon(0.98 * sigma, 64, 8, 100, delta)
    dp = client_dp("privacy.clip=1.0", "privacy.target_epsilon=3.0", "rounds=100")
    assert dp.sigma == pytest.approx(sigma) and dp.delta == pytest.approx(delta)
    with pytest.raises(ValueError, match="target_epsilon=0.01 cannot be met: even σ=100 spends ε=0.0454"):
        client_dp("privacy.clip=1.0", "privacy.target_epsilon=0.01", "rounds=100")


@pytest.mark.parametrize("overrides, match", [
    (["strategy.name=dga", "strategy.beta=2.0", "strategy.weight_by=loss_per_token"], "privacy needs the equal-weight sum"),
    (["strategy.weight_by=num_utts"], "privacy needs the equal-weight sum"),
    (["sampler=weighted"], "privacy needs sampler uniform"),
])
def test_what_the_accountant_cannot_bound_is_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        client_dp("privacy.clip=1.0", "privacy.noise_multiplier=1.0", *overrides)


def test_privacy_keys_without_clip_or_with_both_noise_settings_are_refused():
    with pytest.raises(ValueError, match="do nothing without privacy.clip"):
        FLConfig.from_yaml(None, ["privacy.noise_multiplier=1.0"])
    with pytest.raises(ValueError, match="exactly one of noise_multiplier"):
        FLConfig.from_yaml(None, ["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.target_epsilon=2.0"])


def test_poisson_sampling_includes_each_client_with_probability_k_over_n():
    from fl_lib.fl.sampling import ClientSampler

    ids = [f"c{i}" for i in range(40)]
    sampler = ClientSampler(ids, [1] * 40, per_round=8, mode="poisson", seed=1)
    cohorts = [sampler.sample(r) for r in range(500)]
    sizes = [len(c) for c in cohorts]
    assert min(sizes) < 8 < max(sizes)  # the cohort size varies
    assert sum(sizes) / 500 == pytest.approx(8, abs=0.4)  # q N = 8; standard error of the mean 0.08
    per_client = [sum(cid in c for c in cohorts) / 500 for cid in ids]
    assert all(0.12 < p < 0.29 for p in per_client)  # q = 0.2 each, 500 draws: 4.5 standard errors either way
    assert cohorts[7] == ClientSampler(ids, [1] * 40, per_round=8, mode="poisson", seed=1).sample(7)


def test_poisson_ledgers_rdp_and_pld_against_the_moments_accountant_of_abadi_et_al():
    """Abadi et al. (CCS 2016, §3.1): q = 0.01, σ = 4, T = 10,000 steps give ε = 1.26 at δ = 1e-5 by the
    moments accountant. RDP with dp-accounting's conversion and PLD are tighter analyses of the same
    mechanism: both below 1.26, PLD the tightest."""
    rdp = epsilon(4.0, 100, 1, 10_000, 1e-5, "poisson", "rdp")
    pld = epsilon(4.0, 100, 1, 10_000, 1e-5, "poisson", "pld")
    assert 0.8 < pld < rdp < 1.26


def test_a_pld_ledger_for_fixed_size_cohorts_and_small_poisson_cohorts_skipped_are_refused():
    with pytest.raises(ValueError, match="accountant pld cannot account for sampler uniform"):
        client_dp("privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.accountant=pld")
    with pytest.raises(ValueError, match="min_clients_per_round=2 would skip small cohorts"):
        client_dp("privacy.clip=1.0", "privacy.noise_multiplier=1.0", "sampler=poisson", "min_clients_per_round=2")
    dp = client_dp("privacy.clip=1.0", "privacy.noise_multiplier=1.0", "sampler=poisson", "privacy.accountant=pld")
    assert dp.report(3)["epsilon"] == pytest.approx(epsilon(1.0, 64, 8, 3, 64 ** -1.1, "poisson", "pld"))


def test_the_plan_keeps_a_dev_run_s_noise_per_coordinate_at_a_larger_cohort(capsys):
    import json

    from fl_lib.bin import dp_plan

    dp_plan.main(["--population", "100000", "--cohort", "200", "--rounds", "500", "--delta", "0.00001", "--same_noise_as", "0.5", "8"])
    out = json.loads(capsys.readouterr().out)
    assert out["noise_multiplier"] == pytest.approx(0.5 * 200 / 8) and out["noise_std_over_clip"] == pytest.approx(0.5 / 8)
    # what a run with that plan would report, for each sampler and accountant; PLD the tightest
    for sampler, accountant in (("uniform", "rdp"), ("poisson", "rdp"), ("poisson", "pld")):
        assert out[f"epsilon_{sampler}_{accountant}"] == pytest.approx(epsilon(12.5, 100000, 200, 500, 1e-5, sampler, accountant))
    assert out["epsilon_poisson_pld"] < out["epsilon_poisson_rdp"]


def test_adaptive_clipping_pays_for_its_count_and_follows_the_quantile():
    import dp_accounting

    dp = client_dp("privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.target_quantile=0.5", "privacy.count_noise=2.0")
    # replace-one: the sum's ratio z_sum = sum_sigma / 2, the count's σ_b / 1; together one Gaussian of ratio σ / 2
    single, both = (dp_accounting.rdp.RdpAccountant() for _ in range(2))
    single.compose(dp_accounting.GaussianDpEvent(0.5))
    both.compose(dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(dp.sum_sigma / 2), dp_accounting.GaussianDpEvent(2.0)]))
    assert both.get_epsilon(1e-5) == pytest.approx(single.get_epsilon(1e-5), rel=1e-9)
    assert dp.sum_sigma == pytest.approx(2 * (4 - 0.25) ** -0.5)
    # every client within the clip: b̃ = (8 + noise) / 8 and C ← C · exp(−0.2 (b̃ − 0.5))
    dp.begin_round()
    for _ in range(8):
        dp.bound(result({"w": [0.1, 0.1], "b": [0.1]}))
    dp.privatize(Aggregate({"w": torch.zeros(2), "b": torch.zeros(1)}, {}), num_used=8, draw=0, like={})
    g = torch.Generator().manual_seed(derive_seed(3, "dp_count", 0))
    b = (8 + float(torch.randn((), generator=g, dtype=torch.float64)) * 2.0) / 8
    assert dp.last_quantile == pytest.approx(b) and dp.clip_norm == pytest.approx(math.exp(-0.2 * (b - 0.5)))
    with pytest.raises(ValueError, match="count_noise=0.4 must exceed 0.5"):
        client_dp("privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.target_quantile=0.5", "privacy.count_noise=0.4")
    with pytest.raises(ValueError, match="do nothing without privacy.target_quantile"):
        FLConfig.from_yaml(None, ["privacy.clip=1.0", "privacy.noise_multiplier=1.0", "privacy.clip_lr=0.1"])


def test_a_resumed_run_keeps_the_sigma_its_past_rounds_were_noised_with():
    """target_epsilon solves σ for `rounds`; resumed with more rounds, the checkpoint's σ stands."""
    first = client_dp("privacy.clip=1.0", "privacy.target_epsilon=3.0", "rounds=100")
    longer = client_dp("privacy.clip=1.0", "privacy.target_epsilon=3.0", "rounds=200")
    assert longer.sigma > first.sigma
    longer.load_state_dict(first.state_dict())
    assert longer.sigma == first.sigma and longer.report(150)["epsilon"] > 3.0  # the longer plan overspends, and says so
