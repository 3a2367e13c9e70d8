"""Federated training on the tiny embedded corpus with a real ESPnet model.

Covers: every strategy's aggregate on a BatchNorm model against its formula,
FedProx's pull, resume after `kill -9` (bitwise equal to an uninterrupted run) and
what may change on resume, parallel workers bitwise equal to serial, dropping NaN and
all-steps-invalid clients, rounds that do not count and the run they stop, the N
best rounds kept, init_param/freeze_param, and loading the result with ESPnet's
stock `Speech2Text`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fl_lib.fl.config import FLConfig

FAST = ["clients_per_round=2", "client.max_steps=2", "client.max_duration=15", "keep_checkpoints=2", "validate_every=1"]
CONF_DIR = Path(__file__).resolve().parents[1] / "egs/librispeech_fl/conf"


def run_inprocess(fl_data, out: Path, conf_name: str, overrides=(), **kw):
    from fl_lib.fl.train import train

    conf = FLConfig.from_yaml(CONF_DIR / conf_name, [*FAST, *overrides])
    return train(conf, output_dir=out, **{"seed": 7, **fl_data, **kw})


def fl_train_argv(fl_data, conf_name: str, out: Path, overrides=(), extra=()) -> list[str]:
    """fl_lib.bin.fl_train's arguments for the tiny federation of `fl_data`, seed 7, written to `out`."""
    argv = [
        "--asr_config", fl_data["asr_config"], "--fl_config", CONF_DIR / conf_name,
        "--train_clients", fl_data["train_clients"], "--dev_cuts", fl_data["dev_cuts"],
        "--token_list", fl_data["token_list"], "--bpemodel", fl_data["bpemodel"],
        "--feats_stats", fl_data["feats_stats"], "--seed", "7", "--output_dir", out, *extra, *FAST, *overrides,
    ]
    return [str(a) for a in argv]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def conformer_config(tmp_path_factory, tiny_asr_config) -> Path:
    """A tiny conformer: its convolution module has BatchNorm, whose float buffers are aggregated too."""
    import yaml

    conf = yaml.safe_load(tiny_asr_config.read_text())
    conf["encoder"] = "conformer"
    conf["encoder_conf"] = dict(
        output_size=32, attention_heads=2, linear_units=64, num_blocks=1, input_layer="conv2d",
        use_cnn_module=True, cnn_module_kernel=3, macaron_style=False, dropout_rate=0.1,
    )
    conf["decoder_conf"] = dict(attention_heads=2, linear_units=64, num_blocks=1)
    conf["model_conf"] = dict(ctc_weight=0.5)
    path = tmp_path_factory.mktemp("conformer") / "train_asr_conformer_tiny.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def build_server(fl_data, out: Path, conf_name: str, overrides=(), asr_config=None, seed=7, client_jobs=1, **kw):
    """What `train()` builds, without fitting it: a test drives the rounds and inspects the server."""
    from fl_lib.asr.model import build_asr_args, build_asr_model
    from fl_lib.data.clients import load_clients
    from fl_lib.fl.executor import BatchSpec
    from fl_lib.fl.server import FederatedServer

    conf = FLConfig.from_yaml(CONF_DIR / conf_name, [*FAST, *overrides])
    torch.manual_seed(seed)
    args = build_asr_args(asr_config or fl_data["asr_config"], fl_data["token_list"], fl_data["bpemodel"], fl_data["feats_stats"])
    batches = BatchSpec(fl_data["bpemodel"], fl_data["token_list"], conf.client.max_duration, conf.client.max_cuts)
    clients = load_clients(fl_data["train_clients"])
    return FederatedServer(build_asr_model(args), args, conf, clients, batches, None, out, seed, client_jobs, **kw)


def _floats(state) -> dict:
    return {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}


def _copy(state) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def _expected_weights(conf_name: str, results, beta: float) -> list[float]:
    """Each strategy's client weights, computed here from the clients' own results."""
    if conf_name == "fl_dga_sgd.yaml":
        z = torch.tensor([-beta * r.loss_per_token for r in results], dtype=torch.float64)
        return torch.softmax(z, 0).tolist()
    if conf_name == "fl_bmuf.yaml":
        return [1.0 / len(results)] * len(results)
    total = sum(r.num_utts for r in results)  # fedavg, fedprox: by utterances
    return [r.num_utts / total for r in results]


@pytest.mark.parametrize("conf_name", ["fl_fedavg.yaml", "fl_fedprox.yaml", "fl_dga_sgd.yaml", "fl_bmuf.yaml"])
def test_each_strategy_on_a_batchnorm_model(fl_data, conformer_config, tmp_path, conf_name):
    """Two rounds of every strategy on a conformer (BatchNorm), checked against the strategy's formula.

    The clients are replayed on a second model object from the same start weights
    and seeds; the server's new global state must be the formula applied to those
    results, BatchNorm buffers included. Under BMUF, buffers take the plain client
    mean and no look-ahead, so the running variance stays a variance. The client LR
    halves each round (client.schedule): the replay gets the halved LR explicitly.
    """
    from fl_lib.asr.model import build_asr_model
    from fl_lib.fl.client import LocalTrainer

    halving = ["client.schedule.decay=exponential", "client.schedule.gamma=0.5"]
    server = build_server(fl_data, tmp_path, conf_name, ["clients_per_round=3", *halving], asr_config=conformer_config)
    params = set(server.param_names)
    buffers = {k for k, v in server.global_state.items() if v.is_floating_point()} - params
    assert any(k.endswith("running_var") for k in buffers), "the model has no BatchNorm"
    serial = server.clients_executor.trainer
    replay = LocalTrainer(build_asr_model(server.args), server.args, server.conf.client, serial.make_batches, serial.seed)
    eta, zeta = server.conf.strategy.block_momentum, server.conf.strategy.block_lr
    block = {k: torch.zeros_like(server.global_state[k]) for k in params}  # BMUF's Δ_{t−1}
    for draw in range(2):
        w = _floats(server.global_state)
        start = _copy(server.strategy.broadcast(server.global_state))
        if conf_name == "fl_bmuf.yaml":  # Nesterov look-ahead on parameters only
            assert all(torch.equal(start[k], w[k]) for k in buffers)
            assert all(torch.allclose(start[k], w[k] + eta * block[k]) for k in params)
        results = [
            replay.train(cid, server.clients[cid].manifest, start, draw, server.strategy.proximal_mu, lr_scale=0.5**draw)
            for cid in server.sampler.sample(draw)
        ]
        m = server.run_round(draw)
        assert m.client_lr == server.conf.client.lr * 0.5**draw
        server.draws, server.round = draw + 1, draw + 1
        a = _expected_weights(conf_name, results, server.conf.strategy.beta or 0.0)
        assert m.clients == [r.client_id for r in results] and m.weights == pytest.approx(a, rel=1e-6)
        assert all(torch.equal(server.global_state[k], w[k]) for k in w if k not in server.trained)  # the constants
        for k in server.trained:
            mean = sum(ak * r.delta[k] for ak, r in zip(a, results))
            if conf_name == "fl_bmuf.yaml" and k in params:
                block[k] = eta * block[k] - zeta * mean
                expected = w[k] + block[k]
            else:  # every other strategy with server SGD lr 1, and BMUF's buffers: w − Σ a_k Δ_k
                expected = start[k] - mean
            assert torch.allclose(server.global_state[k], expected, rtol=1e-5, atol=1e-6), k
        assert all((server.global_state[k] > 0).all() for k in buffers if k.endswith("running_var"))


def test_a_robust_rule_feeds_its_aggregate_to_the_server_adam(fl_data, conformer_config, tmp_path):
    """Hierarchical optimization with the coordinate-wise median: one round of 3 clients on a conformer.
    The parameters take one server Adam step on the median of the replayed clients' Δ, the BatchNorm
    buffers move by that median; metrics.jsonl gets each client's share of the kept coordinates."""
    from fl_lib.asr.model import build_asr_model
    from fl_lib.fl.client import LocalTrainer

    server = build_server(fl_data, tmp_path, "fl_fedadam.yaml", ["clients_per_round=3", "strategy.name=median", "strategy.weight_by=null"],
                          asr_config=conformer_config)
    serial = server.clients_executor.trainer
    replay = LocalTrainer(build_asr_model(server.args), server.args, server.conf.client, serial.make_batches, serial.seed)
    start = _copy(server.global_state)
    results = [replay.train(cid, server.clients[cid].manifest, start, 0) for cid in server.sampler.sample(0)]
    median = {k: torch.stack([r.delta[k] for r in results]).median(0).values for k in results[0].delta}  # odd K: the middle value
    params = {k: torch.nn.Parameter(start[k].clone()) for k in server.param_names}
    o = server.conf.server_optim
    adam = torch.optim.Adam(params.values(), lr=server.optimizer.param_groups[0]["lr"], betas=tuple(o.betas), eps=o.eps)
    for k, p in params.items():
        p.grad = median[k]
    adam.step()
    m = server.run_round(0)
    for k, v in server.global_state.items():
        if not v.is_floating_point():
            continue
        expected = params[k].detach() if k in params else start[k] - median[k] if k in median else start[k]
        assert torch.allclose(v, expected, rtol=1e-5, atol=1e-7), k
    assert sum(m.weights) == pytest.approx(1.0) and len(m.weights) == 3


def test_an_attacker_s_forged_update_reaches_the_aggregate_and_is_logged(fl_data, conformer_config, tmp_path):
    """attack sign_flip, f = 1 of K = 3: FedAvg averages the two honest Δ and the attacker's −Δ (weights by
    utterances, its own), and metrics.jsonl names the attacker."""
    from fl_lib.asr.model import build_asr_model
    from fl_lib.fl.client import LocalTrainer

    server = build_server(fl_data, tmp_path, "fl_fedavg.yaml", ["clients_per_round=3", "attack.name=sign_flip", "attack.per_round=1"],
                          asr_config=conformer_config)
    serial = server.clients_executor.trainer
    replay = LocalTrainer(build_asr_model(server.args), server.args, server.conf.client, serial.make_batches, serial.seed)
    start = _copy(server.global_state)
    sampled = server.sampler.sample(0)
    attacker = server.attack.choose(sampled, 0)
    results = [replay.train(cid, server.clients[cid].manifest, start, 0) for cid in sampled]
    m = server.run_round(0)
    assert m.attacked == attacker and len(attacker) == 1
    a = _expected_weights("fl_fedavg.yaml", results, 0.0)
    for k, v in _floats(server.global_state).items():
        if k not in server.trained:  # a constant: no update, forged or not, moves it
            assert torch.equal(v, start[k]), k
            continue
        mean = sum(ak * (-1 if r.client_id in attacker else 1) * r.delta[k] for ak, r in zip(a, results))
        assert torch.allclose(v, start[k] - mean, rtol=1e-5, atol=1e-6), k
    from torch.utils.tensorboard import SummaryWriter

    server.writer = SummaryWriter(str(tmp_path / "tensorboard"))  # what fit() opens before the rounds
    server._record(m)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["attacked"] == attacker


def test_an_attacker_that_finishes_first_forges_from_the_honest_results_and_looks_like_any_client(
        fl_data, conformer_config, tmp_path, monkeypatch):
    """IPM, f = 1 of K = 3, the attacker the first client to return: the server holds its result until
    both honest ones have streamed into the strategy, which then gets −ε·(their mean Δ) under the attacker's
    own id, sizes and loss: nothing in what the strategy sees marks it."""
    import dataclasses

    from fl_lib.asr.model import build_asr_model
    from fl_lib.fl.client import LocalTrainer

    server = build_server(fl_data, tmp_path, "fl_fedavg.yaml", ["clients_per_round=3", "attack.name=ipm", "attack.per_round=1",
                                                                "attack.epsilon=0.5", "min_clients_per_round=2"],
                          asr_config=conformer_config)
    serial = server.clients_executor.trainer
    replay = LocalTrainer(build_asr_model(server.args), server.args, server.conf.client, serial.make_batches, serial.seed)
    start = _copy(server.global_state)
    sampled = server.sampler.sample(0)
    attacker = sampled[0]
    monkeypatch.setattr(server.attack, "choose", lambda clients, draw: [attacker])
    seen = []
    add = server.strategy.add
    monkeypatch.setattr(server.strategy, "add", lambda r: (seen.append(r), add(r))[1])
    results = {cid: replay.train(cid, server.clients[cid].manifest, start, 0) for cid in sampled}
    m = server.run_round(0)
    assert m.attacked == [attacker] and [r.client_id for r in seen] == [*sampled[1:], attacker]
    honest = [results[c] for c in sampled[1:]]
    forged = {k: -0.5 * (honest[0].delta[k].double() + honest[1].delta[k].double()) / 2 for k in honest[0].delta}
    for k, v in seen[-1].delta.items():
        assert torch.allclose(v.double(), forged[k], rtol=1e-4, atol=1e-7), k
    own = results[attacker]
    timing_and_delta = {"delta", "grad_mean", "grad_rms", "grad_var", "delta_finite", "seconds", "cpu_seconds"}
    for f in dataclasses.fields(seen[-1]):
        if f.name not in timing_and_delta:
            assert getattr(seen[-1], f.name) == pytest.approx(getattr(own, f.name)), f.name
    a = _expected_weights("fl_fedavg.yaml", [results[c] for c in sampled], 0.0)
    for k, v in _floats(server.global_state).items():
        if k in server.trained:
            step = sum(ak * (forged[k] if c == attacker else results[c].delta[k].double()) for ak, c in zip(a, sampled))
            assert torch.allclose(v.double(), start[k].double() - step, rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("attack", ["gaussian", "alie", "ipm", "min_max", "min_sum"])
def test_an_attack_forged_from_every_honest_update_refuses_torchrun_ranks(fl_data, tmp_path, attack):
    from fl_lib.fl.distributed import Ranks

    own = ["attack.epsilon=0.5"] if attack == "ipm" else []
    with pytest.raises(ValueError, match=f"attack '{attack}' forges from every honest update of a round.*without torchrun"):
        build_server(fl_data, tmp_path, "fl_fedavg.yaml", ["clients_per_round=3", f"attack.name={attack}", "attack.per_round=1",
                                                          "min_clients_per_round=3", *own],
                     ranks=Ranks(rank=0, world_size=2))


def test_a_round_size_an_attack_cannot_forge_from_is_refused_at_start(fl_data, tmp_path):
    """min-max with f = 1 forges from a spread of at least 2 honest updates: 3 usable clients."""
    with pytest.raises(ValueError, match="min_clients_per_round=2 is below the 3 usable clients a round needs here "
                                         r"\(strategy fedavg, attack min_max\)"):
        build_server(fl_data, tmp_path, "fl_fedavg.yaml", ["clients_per_round=3", "attack.name=min_max", "attack.per_round=1",
                                                          "min_clients_per_round=2"])


DP = ["strategy.weight_by=uniform", "privacy.clip=0.05", "privacy.noise_multiplier=0.5"]


def test_a_private_round_is_the_clipped_sum_plus_one_draw_of_noise_over_k(fl_data, conformer_config, tmp_path):
    """DP-FedAvg on a conformer: start − (Σ_k clip(Δ_k) + N(0, σ²C²)) / K, the noise the round's own seeded draw,
    on what training changes (the parameters and BatchNorm's statistics); the feature normalization is left alone."""
    from fl_lib.asr.model import build_asr_model
    from fl_lib.fl.client import LocalTrainer
    from fl_lib.fl.sampling import derive_seed

    server = build_server(fl_data, tmp_path, "fl_fedavg.yaml", ["clients_per_round=3", *DP], asr_config=conformer_config)
    serial = server.clients_executor.trainer
    replay = LocalTrainer(build_asr_model(server.args), server.args, server.conf.client, serial.make_batches, serial.seed)
    start = _copy(server.global_state)
    results = [replay.train(cid, server.clients[cid].manifest, start, 0) for cid in server.sampler.sample(0)]
    m = server.run_round(0)
    total = {k: torch.zeros_like(v) for k, v in results[0].delta.items()}
    for r in results:
        norm = torch.sqrt(sum(v.double().square().sum() for v in r.delta.values())).item()
        assert norm > 0.05  # the bound binds: the test would not see a missing clip otherwise
        for k, v in r.delta.items():
            total[k] += v * (0.05 / norm)
    g = torch.Generator().manual_seed(derive_seed(7, "dp_noise", 0))
    released = set(server.trained)
    assert {"encoder.encoders.0.conv_module.norm.running_var", "encoder.encoders.0.conv_module.norm.running_mean"} <= released
    for k, v in _floats(server.global_state).items():
        if k not in released:  # the mel filterbank and the feature normalization: constants, not noised
            assert k.startswith(("normalize.", "frontend.logmel.")) and torch.equal(v, start[k]), k
            continue
        noise = torch.randn(v.shape, generator=g) * 0.5 * 0.05
        assert torch.allclose(v, start[k] - (total[k] + noise) / 3, rtol=1e-5, atol=1e-6), k
    assert m.privacy["epsilon"] > 0 and m.privacy["rounds_charged"] == 1 and m.privacy["clipped_fraction"] == 1.0


def test_a_private_run_resumed_has_the_same_model_and_the_same_epsilon(fl_data, tmp_path):
    """With adaptive clipping, so round 2 also needs the clip that round 1 adapted (checkpointed)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    adaptive = [*DP, "privacy.target_quantile=0.5", "privacy.count_noise=1.0"]
    run_inprocess(fl_data, whole, "fl_fedavg.yaml", [*adaptive, "rounds=2"])
    run_inprocess(fl_data, split, "fl_fedavg.yaml", [*adaptive, "rounds=1"])
    run_inprocess(fl_data, split, "fl_fedavg.yaml", [*adaptive, "rounds=2"])  # resumes from round 1
    a, b = torch.load(whole / "2round.pth"), torch.load(split / "2round.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    eps = [[r["privacy"]["epsilon"] for r in metrics(d)] for d in (whole, split)]
    assert eps[0] == eps[1] and eps[0][0] < eps[0][1]
    from fl_lib.asr.results import privacy_lines

    clips = [[r["privacy"]["next_clip"] for r in metrics(d)] for d in (whole, split)]
    assert clips[0] == clips[1] and clips[0][0] != 0.05  # the clip adapted after round 1, and the resumed run kept it
    line = privacy_lines(metrics(split)[-1])[0]
    assert f"(ε = {eps[0][1]:.3g}, δ = " in line and f"after 2 sampled rounds; noise multiplier σ = 0.5, clip C = {clips[0][1]:g} after the last round" in line


def test_an_empty_poisson_cohort_under_dp_still_releases_its_noise(fl_data, tmp_path, monkeypatch):
    """Skipping an empty cohort would reveal its size: the round counts, and the model moves by the noise over K."""
    from fl_lib.fl.sampling import derive_seed

    server = build_server(fl_data, tmp_path, "fl_fedavg.yaml", [*DP, "sampler=poisson", "clients_per_round=2"])
    monkeypatch.setattr(server.sampler, "sample", lambda draw: [])
    start = _floats(server.global_state)
    m = server.run_round(0)
    assert m.clients == [] and m.train_loss is None and m.privacy["rounds_charged"] == 1
    g = torch.Generator().manual_seed(derive_seed(7, "dp_noise", 0))
    for k, v in _floats(server.global_state).items():
        if k in server.trained:
            assert torch.allclose(v, start[k] - torch.randn(v.shape, generator=g) * 0.5 * 0.05 / 2, atol=1e-7), k
        else:
            assert torch.equal(v, start[k]), k


def test_a_round_size_krum_cannot_score_is_refused_at_start(fl_data, tmp_path):
    """Krum with f = 1 needs 4 usable clients: min_clients_per_round must make a smaller round not count
    rather than stop the run."""
    with pytest.raises(ValueError, match="min_clients_per_round=1 is below the 4 usable clients a round needs"):
        build_server(fl_data, tmp_path, "fl_fedavg.yaml", ["clients_per_round=4", "strategy.name=krum", "strategy.weight_by=null",
                                                          "strategy.num_byzantine=1"])


@pytest.mark.parametrize("overrides,refusal", [
    (["strategy.name=median", "strategy.weight_by=null", "strategy.memory_limit_mb=0.01"],
     "K=4 clients of .* floats need .* above strategy.memory_limit_mb=0.01"),
    (["attack.name=min_max", "attack.per_round=1", "attack.memory_limit_mb=0.01", "min_clients_per_round=3"],
     r"K=4 clients \(f=1\) of .* floats need about .* above attack.memory_limit_mb=0.01"),
], ids=["robust_rule", "min_max_attack"])
def test_a_round_that_would_not_fit_is_refused_before_training(fl_data, tmp_path, overrides, refusal):
    with pytest.raises(ValueError, match=refusal):
        build_server(fl_data, tmp_path, "fl_fedavg.yaml", ["clients_per_round=4", *overrides])
    assert not (tmp_path / "metrics.jsonl").exists()


def test_an_attack_that_keeps_updates_is_budgeted_with_the_robust_rows_beside_it(fl_data, tmp_path):
    """min_max keeps 3 x (K - f) x d float64 (72d bytes at K = 4, f = 1) while the median holds 4 x d float32
    (16d) in the same round: a limit of 80d bytes fits either alone but not both, so it must refuse."""
    both = ["clients_per_round=4", "min_clients_per_round=3", "strategy.name=median", "strategy.weight_by=null",
            "attack.name=min_max", "attack.per_round=1"]
    server = build_server(fl_data, tmp_path / "fits", "fl_fedavg.yaml", both)
    d = sum(server.global_state[k].numel() for k in server.trained)
    with pytest.raises(ValueError, match=r"while forging with the strategy's .* MB of rows, above attack.memory_limit_mb"):
        build_server(fl_data, tmp_path / "both", "fl_fedavg.yaml", [*both, f"attack.memory_limit_mb={80 * d / 2**20}"])


def _burn(cpu_seconds: float) -> None:
    end = time.process_time() + cpu_seconds
    while time.process_time() < end:
        pass


def test_server_cpu_seconds_count_the_server_and_not_the_clients(fl_data, tmp_path):
    """A strategy whose aggregate burns 0.4 CPU-s and clients that each burn 0.5 more: the round's
    server_cpu_seconds holds the first and none of the second (the robustness table's cost column)."""
    server = build_server(fl_data, tmp_path, "fl_fedavg.yaml")
    aggregate, train = server.strategy.aggregate, server.clients_executor.trainer.train
    server.strategy.aggregate = lambda: (_burn(0.4), aggregate())[1]
    server.clients_executor.trainer.train = lambda *a, **kw: (_burn(0.5), train(*a, **kw))[1]
    m = server.run_round(0)
    assert len(m.clients) == 2
    assert 0.4 <= m.server_cpu_seconds < 0.4 + 0.5, m.server_cpu_seconds  # a timer over the whole round holds >= 1.4


def test_fedprox_pulls_each_step_back_by_mu(fl_data, conformer_config, tmp_path):
    """With client SGD (lr η), FedProx's second step differs from FedAvg's by exactly −η·μ·(w₁ − w₀).

    Replaces a test that only checked a constructor kept its argument: this one
    fails if μ is not applied, applied twice per step, or applied with the wrong sign.
    """
    from dataclasses import replace

    from fl_lib.asr.model import build_asr_model
    from fl_lib.fl.client import LocalTrainer

    lr, mu = 0.05, 0.5
    overrides = ["client.optim=sgd", f"client.lr={lr}", "client.grad_clip=1000000000.0", "client.max_steps=2", f"strategy.mu={mu}",
                 "client.warmup_steps=0"]  # both steps at lr η
    server = build_server(fl_data, tmp_path, "fl_fedprox.yaml", overrides, asr_config=conformer_config)
    trainer = server.clients_executor.trainer
    one_step = LocalTrainer(build_asr_model(server.args), server.args, replace(server.conf.client, max_steps=1), trainer.make_batches, trainer.seed)
    cid = server.sampler.sample(0)[0]
    manifest, w0 = server.clients[cid].manifest, _copy(server.global_state)
    prox = trainer.train(cid, manifest, w0, 0, server.strategy.proximal_mu).delta
    plain = trainer.train(cid, manifest, w0, 0, 0.0).delta
    first = one_step.train(cid, manifest, w0, 0, 0.0).delta  # Δ₁ = w₀ − w₁
    got = torch.cat([(prox[k] - plain[k]).flatten() for k in server.param_names])
    expected = torch.cat([-lr * mu * first[k].flatten() for k in server.param_names])
    # Exact but for float32 rounding of the weights (~1e-7 per entry), far below the pull itself.
    assert torch.linalg.norm(got - expected) < 1e-3 * torch.linalg.norm(expected)
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-6)


def kill_test_argv(fl_data, out: Path) -> list[str]:
    """The DGA run that the kill tests interrupt and resume, as a command line."""
    return [sys.executable, "-m", "fl_lib.bin.fl_train", *fl_train_argv(fl_data, "fl_dga.yaml", out, ["rounds=3"])]


@pytest.fixture(scope="module")
def straight_run(fl_data, tmp_path_factory) -> Path:
    """The uninterrupted run both kill tests resume towards."""
    straight = tmp_path_factory.mktemp("straight")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(kill_test_argv(fl_data, straight), check=True, env=env, capture_output=True)
    return straight


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_resume_after_kill_is_bitwise_identical(fl_data, straight_run, tmp_path, sig):
    """Killed after its first checkpoint, the run resumes to the uninterrupted run's model, bit for
    bit. SIGTERM is a clean stop: exit status 143, a message, and no temporary file left behind."""
    straight, killed = straight_run, tmp_path / "killed"
    args = kill_test_argv(fl_data, killed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    log = tmp_path / "killed.log"
    with open(log, "w") as err:  # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=err)
    ckpt = killed / "checkpoint.pth"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait()
    stderr = log.read_text()
    assert ckpt.exists(), "the run never reached its first checkpoint"
    done = torch.load(ckpt, weights_only=False)["round"]
    assert done < 3, "the run finished before it could be killed; nothing was resumed"
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, stderr[-2000:]
        assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
        assert not list(killed.glob(".tmp*"))
    else:
        (killed / ".tmp99999.fl_train.latest.pth").write_bytes(b"half-written")  # what a kill during atomic_save leaves
    resumed = subprocess.run(args, check=True, env=env, capture_output=True, text=True)
    assert not list(killed.glob(".tmp*"))
    assert f"resumed from {ckpt}: {done} of 3 rounds done" in resumed.stderr
    a, b = torch.load(straight / "latest.pth"), torch.load(killed / "latest.pth")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["round"] for r in metrics(killed)] == [1, 2, 3]
    assert [r["clients"] for r in metrics(killed)] == [r["clients"] for r in metrics(straight)]


def test_resume_refuses_another_experiment(fl_data, tmp_path):
    """Another seed or federated config in the same output_dir is an error, raised before any file there is rewritten."""
    run_inprocess(fl_data, tmp_path, "fl_fedavg.yaml", ["rounds=1"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="belongs to another experiment: seed differ"):
        run_inprocess(fl_data, tmp_path, "fl_fedavg.yaml", ["rounds=2"], seed=8)
    with pytest.raises(ValueError, match="client differ"):
        run_inprocess(fl_data, tmp_path, "fl_fedavg.yaml", ["rounds=2", "client.lr=0.01"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_resume_accepts_harmless_keys_and_refuses_other_client_data(fl_data, conformer_config, tmp_path):
    """validate_every, keep_checkpoints, dev_max_duration and max_failed_rounds never change what a
    round computes; a client manifest with other content (same ids) is another experiment."""
    import gzip
    import shutil

    from fl_lib.data.clients import load_clients

    clients = load_clients(fl_data["train_clients"])
    listing = tmp_path / "clients.jsonl"
    with open(listing, "w") as f:
        for c in clients:
            copy = shutil.copy(c.manifest, tmp_path / f"{c.id}.jsonl.gz")
            f.write(json.dumps({"id": c.id, "num_cuts": c.num_cuts, "duration": c.duration, "manifest": str(copy)}) + "\n")
    data, out, kw = {**fl_data, "train_clients": listing}, tmp_path / "exp", dict(asr_config=conformer_config)
    run_inprocess(data, out, "fl_fedavg.yaml", ["rounds=1"], **kw)
    harmless = ["validate_every=2", "keep_checkpoints=3", "dev_max_duration=60", "max_failed_rounds=5"]
    run_inprocess(data, out, "fl_fedavg.yaml", ["rounds=2", *harmless], **kw)
    assert [r["round"] for r in metrics(out)] == [1, 2]
    for name in ("config.yaml", "fl_config.yaml", "latest.pth", "valid.acc.best.pth", "checkpoint.pth", "2round.pth"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    manifest = tmp_path / f"{clients[0].id}.jsonl.gz"
    lines = gzip.open(manifest, "rt").read().splitlines(keepends=True)
    with gzip.open(manifest, "wt") as f:  # what stage 2 with a stricter filter leaves: one cut fewer
        f.writelines(lines[:-1])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="belongs to another experiment: clients differ"):
        run_inprocess(data, out, "fl_fedavg.yaml", ["rounds=3", *harmless], **kw)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_parallel_client_jobs_match_serial_bitwise(fl_data, conformer_config, tmp_path, caplog):
    """Each of 2 workers trains >= 2 clients over 2 rounds, accum_grad=2, clients with an odd
    number of batches: a gradient left over from one client would reach the next one's first step."""
    import logging
    import re
    from collections import Counter

    from fl_lib.data.clients import load_clients

    max_cuts = 2
    sizes = [c.num_cuts for c in load_clients(fl_data["train_clients"])]
    assert any(-(-n // max_cuts) % 2 == 1 for n in sizes), "no client has an odd number of batches"
    overrides = [
        "rounds=2", f"clients_per_round={len(sizes)}", "client.max_steps=null", "client.max_duration=null",
        f"client.max_cuts={max_cuts}", "client.accum_grad=2", "client.local_epochs=1",
    ]
    kw = dict(asr_config=conformer_config)
    serial = run_inprocess(fl_data, tmp_path / "serial", "fl_dga.yaml", overrides, **kw)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="fl_lib.fl.server")
    parallel = run_inprocess(fl_data, tmp_path / "parallel", "fl_dga.yaml", overrides, client_jobs=2, **kw)
    workers = Counter(re.findall(r"client \S+: train_loss=.* pid=(\d+)", caplog.text))
    assert len(workers) == 2 and min(workers.values()) >= 2, workers
    assert [r["weights"] for r in metrics(tmp_path / "serial")] == [r["weights"] for r in metrics(tmp_path / "parallel")]
    # The compute axis of bench/convergence.py: every client's optimizer steps, ceil(n / 2) batches // accum_grad each.
    steps = sum(-(-n // max_cuts) // 2 for n in sizes)
    for run in ("serial", "parallel"):
        assert [r["client_steps"] for r in metrics(tmp_path / run)] == [steps, steps], run
        assert all(0 < r["client_seconds"] < r["seconds"] * 2 for r in metrics(tmp_path / run))
        assert all(0 < r["client_cpu_seconds"] for r in metrics(tmp_path / run))  # measured in the worker processes too
    assert all(torch.equal(serial.global_state[k], parallel.global_state[k]) for k in serial.global_state)


def test_nan_client_is_dropped_and_failing_client_reported(fl_data, tmp_path, caplog):
    """One client's audio is NaN (non-finite loss), another's manifest is missing (exception)."""
    from fl_lib.data.clients import load_clients

    clients = load_clients(fl_data["train_clients"])
    nan_id, broken_id = clients[0].id, clients[1].id
    listing = tmp_path / "clients.jsonl"
    with open(listing, "w") as f:
        for c in clients:
            manifest = c.manifest
            if c.id == nan_id:
                manifest = _nan_audio_manifest(c.manifest, tmp_path / "nan.jsonl.gz")
            elif c.id == broken_id:
                manifest = tmp_path / "missing.jsonl.gz"
            f.write(json.dumps({"id": c.id, "num_cuts": c.num_cuts, "duration": c.duration, "manifest": str(manifest)}) + "\n")
    out = tmp_path / "exp"
    n = len(clients)
    run_inprocess({**fl_data, "train_clients": listing}, out, "fl_fedavg.yaml", ["rounds=1", f"clients_per_round={n}"])
    (row,) = metrics(out)
    assert row["dropped"] == [nan_id]
    assert row["failed"] == [broken_id]
    assert sorted(row["clients"]) == sorted(c.id for c in clients if c.id not in (nan_id, broken_id))
    assert f"client {broken_id} failed" in caplog.text


def _listing(tmp_path: Path, fl_data, broken: set) -> Path:
    """A copy of the client listing whose `broken` clients point at a manifest that does not exist."""
    from fl_lib.data.clients import load_clients

    listing = tmp_path / "clients.jsonl"
    listing.write_text("".join(
        json.dumps({"id": c.id, "num_cuts": c.num_cuts, "duration": c.duration,
                    "manifest": str(tmp_path / "missing.jsonl.gz" if c.id in broken else c.manifest)}) + "\n"
        for c in load_clients(fl_data["train_clients"])
    ))
    return listing


def test_rounds_below_min_clients_do_not_count_and_stop_the_run(fl_data, conformer_config, tmp_path):
    """One client of each of two draws fails; min_clients_per_round=3, so no round counts: after
    max_failed_rounds the run stops, and model, server Adam and LR schedule are as they started."""
    from fl_lib.data.clients import load_clients
    from fl_lib.fl.sampling import ClientSampler
    from fl_lib.fl.server import RoundsFailedError

    ids = [c.id for c in load_clients(fl_data["train_clients"])]
    sampler = ClientSampler(ids, [1] * len(ids), 3, "uniform", seed=7)
    broken = sorted(set(sampler.sample(0)) & set(sampler.sample(1)))[0]  # two draws of 3 of 4 clients share one
    listing = _listing(tmp_path, fl_data, {broken})
    overrides = ["rounds=1", "clients_per_round=3", "min_clients_per_round=3", "max_failed_rounds=2"]
    server = build_server({**fl_data, "train_clients": listing}, tmp_path / "exp", "fl_fedadam.yaml", overrides, asr_config=conformer_config)
    assert server.sampler.sample(0) == sampler.sample(0)
    before = _floats(server.global_state)
    optimizer, scheduler = server.optimizer.state_dict(), server.scheduler.state_dict()
    with pytest.raises(RoundsFailedError) as error:
        server.fit()
    message = str(error.value)
    assert "2 sampled rounds in a row had fewer than min_clients_per_round=3" in message
    assert message.count(f"failed ['{broken}']") == 2 and f"first traceback (draw 1, client {broken})" in message
    assert "missing.jsonl.gz" in message  # the traceback itself
    assert server.round == 0 and server.draws == 2
    assert all(torch.equal(before[k], server.global_state[k]) for k in before)
    assert server.optimizer.state_dict() == optimizer and server.scheduler.state_dict() == scheduler
    assert not (tmp_path / "exp" / "checkpoint.pth").exists() and not (tmp_path / "exp" / "metrics.jsonl").exists()


def _fedavg_argv(fl_data, listing: Path, out: Path, k: int, max_failed_rounds: int) -> list[str]:
    """fl_train's command line: FedAvg over `listing`, 2 rounds of all k clients."""
    return [str(a) for a in [
        "--asr_config", fl_data["asr_config"], "--fl_config", CONF_DIR / "fl_fedavg.yaml", "--train_clients", listing,
        "--token_list", fl_data["token_list"], "--bpemodel", fl_data["bpemodel"], "--feats_stats", fl_data["feats_stats"],
        "--output_dir", out, *FAST, "rounds=2", f"clients_per_round={k}", f"max_failed_rounds={max_failed_rounds}",
    ]]


def test_cli_exits_non_zero_when_no_round_counts(fl_data, tmp_path):
    """Every client fails: fl_train exits non-zero naming the clients and the first traceback."""
    from fl_lib.bin.fl_train import main
    from fl_lib.data.clients import load_clients

    ids = {c.id for c in load_clients(fl_data["train_clients"])}
    listing = _listing(tmp_path, fl_data, ids)
    with pytest.raises(SystemExit) as exit_:
        main(_fedavg_argv(fl_data, listing, tmp_path / "exp", len(ids), max_failed_rounds=3))
    message = str(exit_.value.code)  # a string code: Python prints it and exits with status 1
    assert message.startswith("fl_train: 3 sampled rounds in a row")
    assert "Traceback" in message and all(cid in message for cid in ids)
    assert not (tmp_path / "exp" / "1round.pth").exists()


def test_cli_exits_with_its_own_status_when_the_model_diverged(fl_data, tmp_path, capsys):
    """Every client's loss is non-finite and none raised: status EXIT_DIVERGED, not 1, so a study
    records the divergence; the test above (clients that raise) keeps status 1."""
    from fl_lib.bin.fl_train import EXIT_DIVERGED, main
    from fl_lib.data.clients import load_clients

    clients = load_clients(fl_data["train_clients"])
    listing = tmp_path / "nan_clients.jsonl"
    for c in clients:
        (tmp_path / c.id).mkdir()
    listing.write_text("".join(json.dumps({"id": c.id, "num_cuts": c.num_cuts, "duration": c.duration, "manifest": str(
        _nan_audio_manifest(c.manifest, tmp_path / c.id / "nan.jsonl.gz"))}) + "\n" for c in clients))
    with pytest.raises(SystemExit) as exit_:
        main(_fedavg_argv(fl_data, listing, tmp_path / "exp", len(clients), max_failed_rounds=2))
    assert exit_.value.code == EXIT_DIVERGED != 1
    err = capsys.readouterr().err
    assert "the model diverged: 2 sampled rounds in a row" in err


def test_clients_whose_every_step_is_invalid_are_dropped(fl_data, conformer_config, tmp_path):
    """ESPnet skips a step whose gradient norm is not finite; a client with no valid step has Δ = 0
    and a finite loss, and must be dropped and counted, not aggregated at full weight."""
    from fl_lib.fl.server import RoundsFailedError

    server = build_server(fl_data, tmp_path, "fl_fedavg.yaml", ["max_failed_rounds=1"], asr_config=conformer_config)
    for p in server.model.parameters():  # serial mode trains on this object: every gradient becomes inf
        p.register_hook(lambda g: torch.full_like(g, float("inf")))
    before = _floats(server.global_state)
    with pytest.raises(RoundsFailedError, match=r"used \[\], failed \[\], dropped \(non-finite\) \['"):
        server.fit()
    assert all(torch.equal(before[k], server.global_state[k]) for k in before)


def _nan_audio_manifest(src: Path, dst: Path) -> Path:
    """A copy of a client's cuts whose audio is all NaN (float WAV: FLAC cannot hold NaN)."""
    from dataclasses import replace

    import numpy as np
    import soundfile as sf
    from lhotse import CutSet, Recording, load_manifest_lazy

    cuts = []
    for i, cut in enumerate(load_manifest_lazy(src)):
        wav = dst.parent / f"nan{i}.wav"
        sf.write(wav, np.full(cut.recording.num_samples, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
        cuts.append(replace(cut, recording=Recording.from_file(wav, recording_id=cut.recording_id)))
    CutSet.from_cuts(cuts).to_file(dst)
    return dst


def test_the_n_best_rounds_by_dev_score_are_kept(fl_data, conformer_config, tmp_path):
    """As ESPnet's keep_nbest_models: round checkpoints are kept by dev accuracy, not recency."""
    from torch.utils.tensorboard import SummaryWriter

    from fl_lib.fl.server import RoundMetrics

    server = build_server(fl_data, tmp_path, "fl_fedavg.yaml", ["keep_checkpoints=2"], asr_config=conformer_config)
    server.writer = SummaryWriter(str(tmp_path / "tensorboard"))
    server.dev_batches = list  # rounds carry dev scores: valid.acc.best.pth follows them
    for r, acc in enumerate([0.5, 0.2, 0.4, 0.1], 1):
        server.round = r
        with torch.no_grad():
            next(iter(server.server_params.values())).fill_(r)  # tells the round checkpoints apart
        server._record(RoundMetrics(r, 1.0, 2.0, acc, 0.9, ["a"], [1.0], [], [], 1.0, 1e-3, 0.1, 0.1))
    server.writer.close()
    assert sorted(p.name for p in tmp_path.glob("*round.pth")) == ["1round.pth", "3round.pth"]
    name = next(iter(server.server_params))
    assert torch.load(tmp_path / "valid.acc.best.pth")[name].flatten()[0].item() == 1.0
    assert torch.load(tmp_path / "latest.pth")[name].flatten()[0].item() == 4.0


def test_best_criterion_wer_keeps_the_rounds_with_the_lowest_dev_wer(fl_data, conformer_config, tmp_path):
    """best_criterion: wer ranks by the CTC-greedy dev WER, here against dev loss and accuracy:
    valid.acc.best.pth, the kept rounds and each row's dev_score follow the WER."""
    from torch.utils.tensorboard import SummaryWriter

    from fl_lib.fl.server import RoundMetrics

    server = build_server(fl_data, tmp_path, "fl_fedavg.yaml", ["keep_checkpoints=2", "best_criterion=wer"],
                          asr_config=conformer_config)
    server.writer = SummaryWriter(str(tmp_path / "tensorboard"))
    server.dev_batches = list
    # (dev loss, dev acc, dev WER): the loss and the accuracy are best in round 1, the WER in rounds 3 and 2
    for r, (loss, acc, wer) in enumerate([(1.0, 0.9, 0.8), (2.0, 0.5, 0.4), (3.0, 0.4, 0.3), (4.0, 0.3, 0.9)], 1):
        server.round = r
        with torch.no_grad():
            next(iter(server.server_params.values())).fill_(r)
        server._record(RoundMetrics(r, 1.0, loss, acc, wer, ["a"], [1.0], [], [], 1.0, 1e-3, 0.1, 0.1))
    server.writer.close()
    assert sorted(p.name for p in tmp_path.glob("*round.pth")) == ["2round.pth", "3round.pth"]
    name = next(iter(server.server_params))
    assert torch.load(tmp_path / "valid.acc.best.pth")[name].flatten()[0].item() == 3.0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["dev_score"] for row in rows] == [-0.8, -0.4, -0.3, -0.9]


def test_best_criterion_is_checked():
    with pytest.raises(ValueError, match="best_criterion must be one of"):
        FLConfig.from_yaml(CONF_DIR / "fl_fedavg.yaml", ["best_criterion=cer"])


def test_init_param_and_freeze_param_apply_as_in_espnet(fl_data, conformer_config, tmp_path):
    """init_param loads a seed model (ESPnet's load_pretrained_model, here `path:encoder:encoder`);
    freeze_param keeps the frozen parameters where the seed put them through a federated round."""
    import yaml

    from fl_lib.asr.model import build_asr_args, build_asr_model

    args = build_asr_args(conformer_config, fl_data["token_list"], fl_data["bpemodel"], fl_data["feats_stats"])
    torch.manual_seed(123)
    seed_model = build_asr_model(args).state_dict()
    torch.save(seed_model, tmp_path / "seed.pth")
    conf = yaml.safe_load(conformer_config.read_text())
    conf["init_param"] = [f"{tmp_path / 'seed.pth'}:encoder:encoder"]
    conf["freeze_param"] = ["encoder.embed"]
    asr_config = tmp_path / "transfer.yaml"
    asr_config.write_text(yaml.safe_dump(conf))

    server = build_server(fl_data, tmp_path / "exp", "fl_fedavg.yaml", ["rounds=1"], asr_config=asr_config)
    start = _copy(server.global_state)
    encoder = [k for k in seed_model if k.startswith("encoder.")]
    assert encoder and all(torch.equal(start[k], seed_model[k]) for k in encoder)
    assert not all(torch.equal(start[k], seed_model[k]) for k in start if k.startswith("decoder."))  # default init
    frozen = [k for k in start if k.startswith("encoder.embed.")]
    assert frozen and not set(frozen) & set(server.param_names)
    server.fit()
    end = server.global_state
    assert all(torch.equal(end[k], seed_model[k]) for k in frozen)
    assert not all(torch.equal(end[k], start[k]) for k in server.param_names if k.startswith("encoder."))
    with pytest.raises(ValueError, match="freeze_param 'encoder.nothing' matches no parameter"):
        conf["freeze_param"] = ["encoder.nothing"]
        asr_config.write_text(yaml.safe_dump(conf))
        build_asr_model(build_asr_args(asr_config, fl_data["token_list"], fl_data["bpemodel"], fl_data["feats_stats"]))


def test_stock_speech2text_loads_our_weights_unchanged_and_runs(fl_data, tmp_path, tiny_sets):
    """Stock Speech2Text builds the model from our config.yaml and holds our weights, bit for bit;
    one round cannot decode right, so the hypothesis is only run here: tests/test_pack.py checks
    the text a trained model decodes through from_pretrained."""
    from lhotse import load_manifest_lazy

    from fl_lib.espnet_env import quiet_nltk

    run_inprocess(fl_data, tmp_path, "fl_fedavg.yaml", ["rounds=1"])
    quiet_nltk()
    from espnet2.bin.asr_inference import Speech2Text

    s2t = Speech2Text(asr_train_config=str(tmp_path / "config.yaml"), asr_model_file=str(tmp_path / "valid.acc.best.pth"), beam_size=2, maxlenratio=0.3)
    cut = next(iter(load_manifest_lazy(tiny_sets["test-clean"])))
    (text, tokens, token_ids, _hyp), *_ = s2t(torch.from_numpy(cut.load_audio()[0]))
    assert isinstance(text, str) and len(token_ids) == len(tokens)
    saved, loaded = torch.load(tmp_path / "valid.acc.best.pth"), s2t.asr_model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)  # our weights, unchanged
