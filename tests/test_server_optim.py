"""Server optimizers and per-round schedules."""
import math

import pytest
import torch

from fl_lib.fl.config import FLConfig, ScheduleConfig, ServerOptimConfig
from fl_lib.fl.server_optim import LAMB, build_scheduler, build_server_optimizer, lr_factor


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
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = LAMB([p], lr=0.1, eps=0.0)
    p.grad = torch.tensor([0.5, 2.0])
    opt.step()
    trust = 5.0 / math.sqrt(2.0)
    assert p.tolist() == pytest.approx([3.0 - 0.1 * trust, 4.0 - 0.1 * trust])


def test_optimizer_options_that_do_nothing_are_errors():
    with pytest.raises(ValueError, match="momentum"):
        build_server_optimizer([torch.nn.Parameter(torch.zeros(1))], ServerOptimConfig(name="adam", momentum=0.9))
    with pytest.raises(ValueError, match="unknown server_optim"):
        build_server_optimizer([torch.nn.Parameter(torch.zeros(1))], ServerOptimConfig(name="rmsprop"))


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
    conf = FLConfig.from_yaml(path, ["strategy.beta=20", "server_optim.schedule.decay=step", "client.max_steps=7"])
    assert (conf.rounds, conf.strategy.beta, conf.server_optim.schedule.decay, conf.client.max_steps) == (3, 20, "step", 7)
    with pytest.raises(ValueError, match="unknown config key.*strategy.betta"):
        FLConfig.from_yaml(path, ["strategy.betta=2"])
    with pytest.raises(ValueError, match="key=value"):
        FLConfig.from_yaml(path, ["rounds"])
