"""Each strategy's weights and update against hand-computed values on toy tensors."""
import math

import pytest
import torch

from fl_lib.fl.config import ScheduleConfig, ServerOptimConfig, StrategyConfig
from fl_lib.fl.strategies import BMUF, DGA, FedAvg, build_strategy
from fl_lib.fl.strategies.base import ClientResult, WeightedSum


def result(cid, delta, num_utts=1, num_frames=1, loss=1.0, mean=0.0, rms=0.0, var=0.0, tokens=1):
    return ClientResult(cid, {"w": torch.tensor(delta, dtype=torch.float32)}, num_utts, num_frames, loss, mean, rms, var,
                        num_tokens=tokens)


def run(strategy, results):
    strategy.begin_round()
    for r in results:
        strategy.add(r)
    return strategy.aggregate()


def test_fedavg_weights_by_utterances():
    agg = run(FedAvg("num_utts"), [result("a", [1.0, 0.0], num_utts=1), result("b", [0.0, 4.0], num_utts=3)])
    assert agg.weights == pytest.approx({"a": 0.25, "b": 0.75})
    assert agg.pseudo_grad["w"].tolist() == pytest.approx([0.25, 3.0])


def test_fedavg_weights_by_frames():
    agg = run(FedAvg("num_frames"), [result("a", [2.0], num_frames=100), result("b", [0.0], num_frames=300)])
    assert agg.pseudo_grad["w"].tolist() == pytest.approx([0.5])


def test_dga_softmax_of_negative_beta_loss():
    beta, losses = 2.0, [1.0, 2.0, 0.5]
    agg = run(DGA("train_loss", beta), [result(c, [float(i)], loss=l) for i, (c, l) in enumerate(zip("abc", losses))])
    z = [math.exp(-beta * l) for l in losses]
    expect = [v / sum(z) for v in z]
    assert [agg.weights[c] for c in "abc"] == pytest.approx(expect)
    assert agg.pseudo_grad["w"].item() == pytest.approx(sum(w * i for i, w in enumerate(expect)), rel=1e-6)


def test_dga_loss_per_token_hand_computed():
    """q_k = loss per utterance × utterances / tokens: a client with long transcripts is not penalized."""
    # a: 2 utts of 10 tokens, utterance loss 20 -> 2.0/token; b: 4 utts of 2 tokens, loss 6 -> 3.0/token.
    a = result("a", [1.0], num_utts=2, loss=20.0, tokens=20)
    b = result("b", [0.0], num_utts=4, loss=6.0, tokens=8)
    assert (a.loss_per_token, b.loss_per_token) == (2.0, 3.0)
    agg = run(DGA("loss_per_token", 1.0), [a, b])
    assert agg.weights["a"] == pytest.approx(1 / (1 + math.exp(-1.0)))  # e^-2 / (e^-2 + e^-3)
    # By the per-utterance loss the long-transcript client would have been all but dropped.
    assert run(DGA("train_loss", 1.0), [a, b]).weights["a"] < 1e-6


def test_dga_rejects_signed_gradient_mean():
    with pytest.raises(ValueError, match="sign"):
        DGA("grad_mean", 1.0)
    with pytest.raises(ValueError, match="no target tokens"):
        run(DGA("loss_per_token", 1.0), [result("a", [1.0], tokens=0)])


@pytest.mark.parametrize("quantity,field", [("grad_rms", "rms"), ("grad_var", "var")])
def test_dga_gradient_statistics(quantity, field):
    agg = run(DGA(quantity, 1.0), [result("a", [1.0], **{field: 0.0}), result("b", [0.0], **{field: math.log(3)})])
    assert agg.weights["a"] == pytest.approx(0.75)  # e^0 / (e^0 + e^-ln3) = 1 / (1 + 1/3)


def test_dga_uniform():
    agg = run(DGA("uniform", 5.0), [result("a", [1.0], loss=0.1), result("b", [3.0], loss=9.0)])
    assert agg.pseudo_grad["w"].item() == pytest.approx(2.0)


def test_streaming_log_sum_exp_survives_huge_scores():
    """exp(-beta*q) underflows to 0 for large beta*q; the running max keeps it exact."""
    agg = run(DGA("train_loss", 1000.0), [result("a", [1.0], loss=5.0), result("b", [3.0], loss=5.0)])
    assert agg.pseudo_grad["w"].item() == pytest.approx(2.0)
    ws = WeightedSum()
    for cid, s in [("a", -1e5), ("b", -1e5 + math.log(3))]:  # arrival order: low score first
        ws.add(cid, s, {"w": torch.tensor([4.0 if cid == "a" else 0.0])})
    assert ws.result().pseudo_grad["w"].item() == pytest.approx(1.0)


def test_bmuf_block_momentum_and_nesterov_hand_computed():
    eta, zeta = 0.5, 1.0
    bmuf = BMUF(block_momentum=eta, block_lr=zeta, nesterov=True)
    bmuf.bind(["w"])
    w0 = {"w": torch.tensor([10.0])}
    # Round 1: broadcast is w0; clients end at 8 and 6 -> mean 7 -> G = -3; Δ1 = -3.
    assert bmuf.broadcast(w0)["w"].item() == 10.0
    agg = run(bmuf, [result("a", [2.0]), result("b", [4.0])])
    assert agg.pseudo_grad["w"].item() == pytest.approx(3.0)  # w1 = 10 - 3 = 7
    w1 = {"w": torch.tensor([7.0])}
    # Round 2: Nesterov broadcast b = w1 + eta*Δ1 = 5.5; clients end at 5 -> G = -0.5;
    # Δ2 = eta*Δ1 + zeta*G = -1.5 - 0.5 = -2; w2 = 5.
    b = bmuf.broadcast(w1)["w"].item()
    assert b == pytest.approx(5.5)
    agg = run(bmuf, [result("a", [0.5]), result("b", [0.5])])
    assert agg.pseudo_grad["w"].item() == pytest.approx(2.0)
    state = bmuf.state_dict()
    other = BMUF(block_momentum=eta, block_lr=zeta, nesterov=True)
    other.load_state_dict(state)
    assert other.momentum_buffer["w"].item() == pytest.approx(-2.0)


def test_bmuf_rejects_other_server_optimizers():
    with pytest.raises(ValueError, match="bmuf"):
        BMUF(0.9).check_server_optimizer(ServerOptimConfig(name="adam", lr=0.01))


@pytest.mark.parametrize(
    "schedule",
    [
        ScheduleConfig(warmup_rounds=2),
        ScheduleConfig(decay="exponential", gamma=0.9),
        ScheduleConfig(decay="step", step_size=3, gamma=0.5),
    ],
)
def test_bmuf_rejects_a_server_lr_schedule(schedule):
    """A warmup or decay of the server lr would scale every block update Δ_t."""
    with pytest.raises(ValueError, match="bmuf needs a constant server lr 1"):
        BMUF(0.9).check_server_optimizer(ServerOptimConfig(schedule=schedule))


def test_bmuf_accepts_constant_lr_1():
    BMUF(0.9).check_server_optimizer(ServerOptimConfig(name="sgd", lr=1.0, schedule=ScheduleConfig()))
    BMUF(0.9).check_server_optimizer(ServerOptimConfig())  # the defaults: sgd, constant lr 1


def test_bmuf_averages_float_buffers_plainly():
    """A BatchNorm running variance takes the plain client mean: no block momentum, no look-ahead.
    Extrapolated like a weight (w + η·Δ), the variance below would go negative."""
    eta = 0.9
    bmuf = BMUF(block_momentum=eta, block_lr=1.0, nesterov=True)
    with pytest.raises(RuntimeError, match="bind"):
        run(bmuf, [result("a", [1.0])])
    bmuf.bind(["w"])

    def client(cid, dw, dvar):
        return ClientResult(cid, {"w": torch.tensor([dw]), "bn.running_var": torch.tensor([dvar])}, 1, 1, 1.0, 0.0, 0.0, 0.0)

    state = {"w": torch.tensor([10.0]), "bn.running_var": torch.tensor([1.0])}
    for deltas in ([(2.0, 0.8), (4.0, 0.6)], [(1.0, -0.1), (1.0, 0.1)]):
        start = bmuf.broadcast(state)
        assert start["bn.running_var"] is state["bn.running_var"]  # never looked ahead
        agg = run(bmuf, [client(c, dw, dv) for c, (dw, dv) in zip("ab", deltas)])
        mean_dvar = sum(dv for _, dv in deltas) / 2
        assert agg.pseudo_grad["bn.running_var"].item() == pytest.approx(mean_dvar)  # the server subtracts it
        state = {k: start[k] - agg.pseudo_grad[k] for k in state}
    assert state["bn.running_var"].item() == pytest.approx(0.3)  # 1 − 0.7, then the mean of 0.3 ± 0.1
    assert set(bmuf.momentum_buffer) == {"w"}


def test_bmuf_rejects_server_weight_decay():
    with pytest.raises(ValueError, match="weight_decay=0.0 .*weight_decay=0.01"):
        BMUF(0.9).check_server_optimizer(ServerOptimConfig(weight_decay=0.01))


def test_weighted_sampler_with_size_weights_is_rejected():
    """Drawing clients ∝ n_k and weighting them ∝ n_k again gives weights ∝ n_k²."""
    for weight_by in ("num_utts", "num_frames"):
        with pytest.raises(ValueError, match="effective weight ∝ size²"):
            FedAvg(weight_by).check_sampler("weighted")
        with pytest.raises(ValueError, match="effective weight ∝ size²"):
            build_strategy(StrategyConfig(name="fedprox", mu=0.1, weight_by=weight_by)).check_sampler("weighted")
        FedAvg(weight_by).check_sampler("uniform")
    unbiased = build_strategy(StrategyConfig(name="fedavg", weight_by="uniform"))
    unbiased.check_sampler("weighted")
    agg = run(unbiased, [result("a", [1.0], num_utts=1), result("b", [3.0], num_utts=100)])
    assert agg.weights == pytest.approx({"a": 0.5, "b": 0.5})
    DGA("train_loss", 1.0).check_sampler("weighted")  # not weighted by size: nothing counted twice


def test_build_strategy_rejects_unused_options():
    with pytest.raises(ValueError, match="does not use: beta"):
        build_strategy(StrategyConfig(name="fedavg", beta=1.0))
    with pytest.raises(ValueError, match="needs 'beta'"):
        build_strategy(StrategyConfig(name="dga"))
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy(StrategyConfig(name="fedsgd"))


def test_dga_uniform_needs_no_beta_and_rejects_one():
    assert build_strategy(StrategyConfig(name="dga", weight_by="uniform")).weight_by == "uniform"
    with pytest.raises(ValueError, match="weight_by 'uniform' does not use: beta"):
        build_strategy(StrategyConfig(name="dga", weight_by="uniform", beta=2.0))
    with pytest.raises(ValueError, match="needs 'beta'"):
        build_strategy(StrategyConfig(name="dga", weight_by="grad_var"))


def test_no_client_gives_no_aggregate():
    s = FedAvg()
    s.begin_round()
    assert s.aggregate() is None
