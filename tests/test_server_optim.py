"""Server optimizers and per-round schedules."""
import math
from pathlib import Path

import pytest
import torch

from conftest import bench_module

from fl_lib.fl.config import FLConfig, ScheduleConfig, ServerOptimConfig, parse_override
from fl_lib.fl.server_optim import ADAM_BETAS, ADAM_EPS, LAMB, build_scheduler, build_server_optimizer, lr_factor
from fl_lib.fl.strategies import build_strategy

ROOT = Path(__file__).resolve().parents[1]


def step(opt_conf, grads, w0=1.0):
    p = torch.nn.Parameter(torch.tensor([w0]))
    opt = build_server_optimizer([p], opt_conf)
    for g in grads:
        p.grad = torch.tensor([g])
        opt.step()
    return p.item()


def test_sgd_lr1_is_fedavg():
    assert step(ServerOptimConfig(name="sgd", lr=1.0), [0.25]) == pytest.approx(0.75)


def test_sgd_momentum():
    # v1 = 1, w = 1 - 0.1; v2 = 0.9 + 1 = 1.9, w = 0.9 - 0.19
    assert step(ServerOptimConfig(name="sgd", lr=0.1, momentum=0.9), [1.0, 1.0]) == pytest.approx(0.71)


def test_adam_first_step_moves_by_lr():
    assert step(ServerOptimConfig(name="adam", lr=0.01, eps=1e-12), [123.0]) == pytest.approx(0.99)


def test_lamb_trust_ratio():
    # First step: m_hat = g, v_hat = g^2 -> update = sign(g) = [1, 1]; ||w|| = 5, ||u|| = sqrt(2)
    p = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    opt = LAMB([p], lr=0.1, eps=0.0)
    p.grad = torch.tensor([[0.5, 2.0]])
    opt.step()
    trust = 5.0 / math.sqrt(2.0)
    assert p.flatten().tolist() == pytest.approx([3.0 - 0.1 * trust, 4.0 - 0.1 * trust])


def test_lamb_trust_ratio_is_bounded():
    """‖w‖ = 500 against ‖u‖ = √2 would scale the step by 354; the bound keeps it at 10."""
    p = torch.nn.Parameter(torch.tensor([[300.0, 400.0]]))
    opt = LAMB([p], lr=0.1, eps=0.0)
    p.grad = torch.tensor([[0.5, 2.0]])
    opt.step()
    assert p.flatten().tolist() == pytest.approx([300.0 - 0.1 * 10, 400.0 - 0.1 * 10])


def test_lamb_biases_and_norms_take_the_plain_adam_step():
    """1-D tensors (biases, LayerNorm/BatchNorm parameters): no trust ratio and no weight decay."""
    bias = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = LAMB([bias], lr=0.1, eps=0.0, weight_decay=0.5)
    bias.grad = torch.tensor([0.5, -2.0])
    opt.step()
    assert bias.tolist() == pytest.approx([3.0 - 0.1, 4.0 + 0.1])  # Adam's first step: lr·sign(g)


def test_warmup_then_step_and_exponential_decay():
    step_conf = ScheduleConfig(warmup_rounds=2, decay="step", step_size=2, gamma=0.5)
    assert [lr_factor(r, step_conf) for r in range(7)] == [0.5, 1.0, 1.0, 1.0, 0.5, 0.5, 0.25]
    exp_conf = ScheduleConfig(decay="exponential", gamma=0.9)
    assert lr_factor(3, exp_conf) == pytest.approx(0.729)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = build_scheduler(opt, step_conf)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == [1.0, 2.0, 2.0]


def test_config_yaml_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "fl.yaml"
    path.write_text("rounds: 3\nstrategy:\n  name: dga\n  beta: 1.0\n")
    overrides = ["strategy.beta=20", "server_optim.schedule.decay=exponential", "server_optim.schedule.gamma=0.9", "client.max_steps=7"]
    conf = FLConfig.from_yaml(path, overrides)
    assert (conf.rounds, conf.strategy.beta, conf.server_optim.schedule.decay, conf.client.max_steps) == (3, 20, "exponential", 7)
    with pytest.raises(ValueError, match="unknown config key.*strategy.betta"):
        FLConfig.from_yaml(path, ["strategy.betta=2"])
    with pytest.raises(ValueError, match="key=value"):
        FLConfig.from_yaml(path, ["rounds"])


def test_adam_and_lamb_defaults_when_betas_eps_not_given():
    for name in ("adam", "lamb"):
        group = build_server_optimizer([torch.nn.Parameter(torch.zeros(1))], ServerOptimConfig(name=name, lr=0.1)).param_groups[0]
        assert (tuple(group["betas"]), group["eps"]) == (ADAM_BETAS, ADAM_EPS)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="sgd", betas=[0.9, 0.99]), r"server_optim 'sgd' does not use: betas \(those are adam/lamb options\)"),
        (dict(name="sgd", eps=1e-6), "'sgd' does not use: eps"),
        (dict(name="adam", momentum=0.9), r"'adam' does not use: momentum \(those are sgd options\)"),
        (dict(name="lamb", momentum=0.9, nesterov=True), "'lamb' does not use: momentum, nesterov"),
        (dict(name="rmsprop"), "unknown server_optim 'rmsprop'"),
    ],
)
def test_options_of_another_optimizer_are_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ServerOptimConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(gamma=0.5), r"gamma=0.5 does nothing with decay: none"),
        (dict(step_size=5), r"step_size is only used by decay: step, but decay is 'none'"),
        (dict(decay="exponential", gamma=0.9, step_size=5), r"step_size is only used by decay: step, but decay is 'exponential'"),
        (dict(decay="exponential"), r"decay: exponential needs a gamma > 0 other than 1.0 .*got 1.0"),
        (dict(decay="exponential", gamma=1.0), r"decay: exponential needs a gamma > 0 other than 1.0"),
        (dict(decay="step", step_size=2), r"decay: step needs a gamma > 0 other than 1.0"),
        (dict(decay="step", gamma=0.0, step_size=2), r"got 0.0"),
        (dict(decay="step", gamma=0.5), r"decay: step needs step_size >= 1 .*got None"),
        (dict(decay="step", gamma=0.5, step_size=0), r"step_size >= 1 .*got 0"),
        (dict(decay="step", gamma=0.5, step_size=-2), r"step_size >= 1 .*got -2"),
        (dict(decay="cosine"), "unknown server_optim.schedule.decay 'cosine'"),
        (dict(warmup_rounds=-1), "warmup_rounds must be >= 0"),
    ],
)
def test_schedule_keys_that_do_nothing_are_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScheduleConfig(**kwargs)


def test_bad_step_size_fails_at_load_not_at_round_w():
    """With warmup, a step_size of 0 used to divide by zero only in the first round after it."""
    overrides = ["server_optim.schedule.warmup_rounds=3", "server_optim.schedule.decay=step", "server_optim.schedule.gamma=0.5"]
    with pytest.raises(ValueError, match="step_size >= 1"):
        FLConfig.from_yaml(None, [*overrides, "server_optim.schedule.step_size=0"])


@pytest.mark.parametrize("key", ["keep_checkpoints", "validate_every", "clients_per_round", "min_clients_per_round", "max_failed_rounds"])
def test_counts_below_one_are_errors(key):
    with pytest.raises(ValueError, match=f"{key} must be >= 1, got 0"):
        FLConfig.from_yaml(None, [f"{key}=0"])


def test_min_clients_per_round_above_clients_per_round_is_an_error():
    with pytest.raises(ValueError, match="min_clients_per_round=5 exceeds clients_per_round=4: no round could count"):
        FLConfig.from_yaml(None, ["clients_per_round=4", "min_clients_per_round=5"])


def shipped_configs():
    """(name, config path, overrides) of every recipe FL config and every benchmark run."""
    convergence = bench_module("convergence")
    recipe = ROOT / "egs/librispeech_fl"
    runs = [(p.name, p, []) for p in sorted((recipe / "conf").glob("fl_*.yaml"))]
    for study in sorted((ROOT / "bench").glob("convergence*.yaml")):
        bench = convergence.load_study(study)
        for method, m in bench["methods"].items():
            runs += [(f"{study.stem}-{method}-{convergence.setting_label(g)}", recipe / m["fl_config"],
                      convergence.fl_overrides(bench, m, g)) for g in m["grid"]]
    return runs


SHIPPED_CONFIGS = shipped_configs()


@pytest.mark.parametrize("name,path,overrides", SHIPPED_CONFIGS, ids=[r[0] for r in SHIPPED_CONFIGS])
def test_shipped_configs_load_and_build(name, path, overrides):
    conf = FLConfig.from_yaml(path, overrides)
    for key, value in map(parse_override, overrides):  # each override reached the config it names
        node = conf
        for part in key.split("."):
            node = getattr(node, part)
        assert (list(node) if isinstance(node, tuple) else node) == value, key
    strategy = build_strategy(conf.strategy)
    opt = conf.server_optim
    strategy.check_server_optimizer(opt)
    strategy.check_sampler(conf.sampler)
    build_scheduler(build_server_optimizer([torch.nn.Parameter(torch.zeros(1))], opt), opt.schedule)
