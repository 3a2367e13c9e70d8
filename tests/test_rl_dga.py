"""rl_dga: the agent learns to down-weight a harmful client, candidates never touch the server's
state, bad inputs fail clearly, and a real ESPnet run resumes bitwise with the agent state.

The toy federation (no audio) is linear regression: each client runs a few SGD steps
of a `torch.nn.Linear` from the global weights, and its Δ and statistics come from the
product's `pseudo_gradient`. The server side is the product's too: `build_strategy`,
`build_server_optimizer` and `trial_step` for the candidate models.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from fl_lib.fl.client import pseudo_gradient
from fl_lib.fl.config import FLConfig, ServerOptimConfig, StrategyConfig
from fl_lib.fl.server_optim import build_server_optimizer, trial_step
from fl_lib.fl.strategies import RLDGA, build_strategy
from fl_lib.fl.strategies.base import ClientResult
from fl_lib.fl.strategies.rl_dga import relative_improvement

DIM = 8
BAD = "c5"
RL = dict(name="rl_dga", weight_by="loss_per_token", beta=2.0, held_out_utts=1)


class Toy:
    """Six clients of one regression task; client `BAD` sends −5·Δ (sign-flipped, ×5)."""

    def __init__(self, seed: int = 0, num_clients: int = 6) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w_true = torch.randn(1, DIM, generator=g)

        def data(n):
            x = torch.randn(n, DIM, generator=g)
            return x, x @ self.w_true.T + 0.1 * torch.randn(n, 1, generator=g)

        self.clients = {f"c{i}": data(20) for i in range(num_clients)}
        self.held_out, self.valid = data(64), data(256)
        self.model = torch.nn.Linear(DIM, 1)

    @staticmethod
    def loss(state, xy) -> float:
        x, y = xy
        return float(((x @ state["weight"].T + state["bias"] - y) ** 2).mean())

    def train(self, cid: str, start: dict) -> ClientResult:
        self.model.load_state_dict(start)
        opt = torch.optim.SGD(self.model.parameters(), lr=0.05)
        x, y = self.clients[cid]
        losses = []
        for _ in range(5):
            loss = ((self.model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        delta, stats, _ = pseudo_gradient(start, self.model)
        if cid == BAD:  # the attack hides in the update; the loss it reports is honest
            delta = {k: -5 * v for k, v in delta.items()}
            stats = {"grad_mean": -5 * stats["grad_mean"], "grad_rms": 5 * stats["grad_rms"], "grad_var": 25 * stats["grad_var"]}
        n = len(x)
        return ClientResult(cid, delta, n, n, sum(losses) / len(losses), num_tokens=n, **stats)


def run_toy(strategy_conf: StrategyConfig, rounds: int, per_round=lambda r: 4, seed: int = 0):
    """The server loop on the toy federation; returns (strategy, final validation loss, per-round metrics)."""
    toy = Toy(seed)
    torch.manual_seed(seed)
    params = {k: torch.nn.Parameter(v.detach().clone()) for k, v in torch.nn.Linear(DIM, 1).state_dict().items()}
    state = {k: p.data for k, p in params.items()}
    optimizer = build_server_optimizer(list(params.values()), ServerOptimConfig())  # SGD lr 1: w − g
    strategy = build_strategy(strategy_conf, seed)
    strategy.bind(params)
    if strategy.needs_judge:
        strategy.judge = lambda g: toy.loss(trial_step(optimizer, params, state, g), toy.held_out)
    ids = sorted(toy.clients)
    rng = torch.Generator().manual_seed(seed + 1)
    history = []
    for r in range(rounds):
        sampled = [ids[i] for i in torch.randperm(len(ids), generator=rng)[: per_round(r)].tolist()]
        strategy.begin_round()
        start = {k: v.clone() for k, v in state.items()}
        for cid in sampled:
            strategy.add(toy.train(cid, start))
        agg = strategy.aggregate()
        for k, p in params.items():
            p.grad = agg.pseudo_grad[k]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"clients": sampled, "weights": agg.weights, **strategy.round_metrics()})
    return strategy, toy.loss(state, toy.valid), history


def test_agent_learns_to_down_weight_a_harmful_client():
    """Within 30 rounds of K=4, the agent's own weight for the sign-flipped ×5 client is below a
    quarter of uniform (1/16) every time it is sampled in the last 15 rounds, and the model
    beats plain uniform averaging (which the harmful client drags away from the optimum)."""
    rounds, k = 30, 4
    strategy, rl_loss, history = run_toy(StrategyConfig(**RL), rounds)
    late = [h["agent_weights"][BAD] for h in history[-15:] if BAD in h["clients"]]
    assert len(late) >= 5
    assert max(late) < 0.25 / k, late
    early = [h["agent_weights"][BAD] for h in history[:5] if BAD in h["clients"]]
    assert max(early) > 0.25 / k  # it had to learn this: round 1 scores are all zero
    assert sum(h["applied"] == "agent" for h in history[-15:]) >= 10  # and its candidate wins
    _, uniform_loss, _ = run_toy(StrategyConfig(name="dga", weight_by="uniform"), rounds)
    _, dga_loss, _ = run_toy(StrategyConfig(name="dga", weight_by="loss_per_token", beta=2.0), rounds)
    assert rl_loss < 0.1 * uniform_loss, (rl_loss, uniform_loss)
    assert rl_loss < 0.1 * dga_loss, (rl_loss, dga_loss)
    assert len(strategy.memory) == rounds


def test_reward_sign_and_apply_rule():
    """Lower held-out loss of the agent's candidate: positive reward, and the agent's candidate
    is the one returned; higher: negative reward, the reference is returned."""
    assert relative_improvement(0.5, 1.0) == pytest.approx(0.5)
    assert relative_improvement(1.5, 1.0) == pytest.approx(-0.5)
    assert relative_improvement(30.0, 1.0) == -1.0 and relative_improvement(math.nan, 1.0) == -1.0
    assert relative_improvement(1.0, math.inf) == 1.0 and relative_improvement(math.nan, math.inf) is None
    for agent_better in (True, False):
        s = build_strategy(StrategyConfig(**RL, explore_std=2.0), seed=3)
        s.bind(["w"])
        # The judge sees the candidates in the order (agent, reference).
        losses = iter([1.0, 2.0] if agent_better else [2.0, 1.0])
        s.judge = lambda g: next(losses)
        s.begin_round()
        for i, loss in enumerate([1.0, 3.0]):
            s.add(ClientResult(f"c{i}", {"w": torch.tensor([float(i + 1)])}, 4, 4, loss, 0.1, 1.0, 0.5, num_tokens=4))
        agg = s.aggregate()
        m = s.round_metrics()
        assert (m["reward"] > 0) == agent_better
        assert m["applied"] == ("agent" if agent_better else "reference")
        reference = {"c0": 1 / (1 + math.exp(-4)), "c1": 1 / (1 + math.exp(4))}  # softmax(−β·loss), β = 2
        assert agg.weights == pytest.approx(m["agent_weights"] if agent_better else reference)


@pytest.mark.parametrize("conf", [
    ServerOptimConfig(name="adam", lr=0.1), ServerOptimConfig(name="lamb", lr=0.1), ServerOptimConfig(momentum=0.9),
], ids=["adam", "lamb", "sgd-momentum"])
def test_trial_step_leaves_server_state_alone_and_matches_the_real_step(conf):
    """A stateful server optimizer with a scheduled lr: the trial gives bitwise the weights of the
    real step, and the parameters and the optimizer state (moments, step count) are untouched by it."""
    params = {"w": torch.nn.Parameter(torch.tensor([1.0, -2.0])), "v": torch.nn.Parameter(torch.tensor([[0.5]]))}
    state = {k: p.data for k, p in params.items()} | {"bn.running_var": torch.tensor([1.0])}
    opt = build_server_optimizer(list(params.values()), conf)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda r: 0.5 ** r)
    g1 = {"w": torch.tensor([0.3, 0.1]), "v": torch.tensor([[-0.2]]), "bn.running_var": torch.tensor([0.25])}
    for k, p in params.items():
        p.grad = g1[k].clone()
    opt.step(), sched.step()
    before_state = {k: v.clone() for k, v in state.items()}
    before_opt = copy.deepcopy(opt.state_dict())
    g2 = {"w": torch.tensor([-0.1, 0.4]), "v": torch.tensor([[0.3]]), "bn.running_var": torch.tensor([0.5])}
    trial = trial_step(opt, params, state, g2)
    assert all(torch.equal(state[k], before_state[k]) for k in state)
    assert _same_optimizer_state(opt.state_dict(), before_opt)
    assert trial["bn.running_var"].item() == pytest.approx(0.5)
    for k, p in params.items():
        p.grad = g2[k].clone()
    opt.step()
    assert all(torch.equal(trial[k], state[k]) for k in params)


def _same_optimizer_state(a: dict, b: dict) -> bool:
    def same(x, y):
        return torch.equal(x, y) if torch.is_tensor(x) else x == y

    return a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys() and all(
        same(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])


def test_single_client_round_applies_it_without_judging():
    s = build_strategy(StrategyConfig(**RL), seed=0)
    s.bind(["w"])

    def judge(_g):
        raise AssertionError("one client: nothing to compare")

    s.judge = judge
    s.begin_round()
    s.add(ClientResult("a", {"w": torch.tensor([2.0])}, 3, 3, 1.0, 0.1, 1.0, 0.5, num_tokens=3))
    agg = s.aggregate()
    assert agg.weights == {"a": 1.0} and agg.pseudo_grad["w"].item() == 2.0
    assert s.round_metrics()["applied"] == "single_client" and not s.memory and s.rounds_seen == 1


def test_clients_per_round_may_change_every_round():
    """K from 1 to 6 across rounds: the shared scorer handles any K; single-client rounds add no
    experience, every other round adds one with as many rows as clients."""
    sizes = [2, 5, 1, 3, 6, 4, 1, 2]
    strategy, loss, history = run_toy(StrategyConfig(**RL), len(sizes), per_round=lambda r: sizes[r])
    assert [len(h["agent_weights"]) for h in history] == sizes
    assert all(sum(h["agent_weights"].values()) == pytest.approx(1.0) for h in history)
    assert [len(m["da"]) for m in strategy.memory] == [k for k in sizes if k > 1]
    assert [h["applied"] == "single_client" for h in history] == [k == 1 for k in sizes]
    assert math.isfinite(loss)


def test_non_finite_feature_and_missing_judge_are_clear_errors():
    s = build_strategy(StrategyConfig(**RL), seed=0)
    s.bind(["w"])
    s.begin_round()
    with pytest.raises(ValueError, match=r"client bad: rl_dga feature\(s\) not finite: log_var=inf"):
        s.add(ClientResult("bad", {"w": torch.tensor([1.0])}, 3, 3, 1.0, 0.1, 1.0, math.inf, num_tokens=3))
    s.begin_round()
    for cid in "ab":
        s.add(ClientResult(cid, {"w": torch.tensor([1.0])}, 3, 3, 1.0, 0.1, 1.0, 0.5, num_tokens=3))
    with pytest.raises(RuntimeError, match="held-out judge"):
        s.aggregate()


def test_empty_held_out_set_is_an_error(tmp_path, tiny_sets):
    from lhotse import load_manifest_lazy

    from fl_lib.data.held_out import split_held_out
    from fl_lib.fl.validation import held_out_loss

    with pytest.raises(ValueError, match="held_out_utts must be an integer >= 1"):
        build_strategy(StrategyConfig(**{**RL, "held_out_utts": 0}))
    with pytest.raises(ValueError, match="needs 'held_out_utts'"):
        build_strategy(StrategyConfig(**{**RL, "held_out_utts": None}))
    with pytest.raises(ValueError, match="does not use: held_out_utts"):
        build_strategy(StrategyConfig(name="dga", beta=1.0, held_out_utts=4))
    with pytest.raises(ValueError, match="the held-out set gave no batch"):
        held_out_loss(torch.nn.Linear(1, 1), [])
    dev = tiny_sets["dev-clean"]
    n = sum(1 for _ in load_manifest_lazy(dev))
    with pytest.raises(ValueError, match="at least 1 must stay for model selection"):
        split_held_out(dev, n, 0, tmp_path)
    held, rest = split_held_out(dev, 2, 0, tmp_path)
    held_ids, rest_ids = {c.id for c in load_manifest_lazy(held)}, {c.id for c in load_manifest_lazy(rest)}
    assert len(held_ids) == 2 and len(rest_ids) == n - 2 and not held_ids & rest_ids  # disjoint, nothing lost
    assert split_held_out(dev, 2, 0, tmp_path / "again")[0].read_bytes() == held.read_bytes()  # seeded


def test_rl_dga_config_keys_are_strict():
    with pytest.raises(ValueError, match="does not use: temperature"):
        build_strategy(StrategyConfig(name="fedavg", temperature=0.1))
    with pytest.raises(ValueError, match="does not use: mu"):
        build_strategy(StrategyConfig(**RL, mu=0.1))
    with pytest.raises(ValueError, match="invalid temperature"):
        build_strategy(StrategyConfig(**RL, temperature=0.0))
    s = build_strategy(StrategyConfig(**RL, explore_std=0.5, explore_decay=0.5, explore_min=0.2))
    assert isinstance(s, RLDGA) and s.current_explore_std == 0.5
    s.rounds_seen = 2
    assert s.current_explore_std == 0.2  # 0.5 · 0.5² = 0.125, floored


# -- a real ESPnet model on the tiny embedded corpus -------------------------------------------
CONF = Path(__file__).resolve().parents[1] / "egs/librispeech_fl/conf/fl_rl_dga.yaml"
FAST = ["clients_per_round=3", "client.max_steps=2", "client.max_duration=15", "keep_checkpoints=1",
        "validate_every=1", "strategy.held_out_utts=3", "server_optim.schedule.warmup_rounds=0"]


@pytest.fixture(scope="module")
def fl_data(tiny_clients, tiny_sets, tiny_tokens, tiny_stats, tiny_asr_config):
    bpemodel, token_list = tiny_tokens
    return dict(asr_config=tiny_asr_config, train_clients=tiny_clients, dev_cuts=tiny_sets["dev-clean"],
                token_list=token_list, bpemodel=bpemodel, feats_stats=tiny_stats, seed=7)


def test_candidates_leave_the_server_alone_and_one_step_applies_the_chosen(fl_data, tmp_path):
    """Each judged candidate is built while the global model and the server Adam are as the
    round found them; after the round the global model is bitwise the chosen candidate,
    and Adam has stepped exactly once per round."""
    from lhotse import load_manifest_lazy

    from fl_lib.fl.train import build_server

    server = build_server(FLConfig.from_yaml(CONF, FAST), output_dir=tmp_path, **fl_data)
    judge, seen = server.strategy.judge, []

    def watching(pseudo_grad):
        assert all(torch.equal(server.global_state[k], before[k]) for k in before)
        assert _same_optimizer_state(server.optimizer.state_dict(), opt_before)
        seen.append(trial_step(server.optimizer, server.server_params, server.global_state, pseudo_grad))
        return judge(pseudo_grad)

    server.strategy.judge = watching
    for draw in range(2):
        before = {k: v.clone() for k, v in server.global_state.items()}
        opt_before = copy.deepcopy(server.optimizer.state_dict())
        seen.clear()
        m = server.run_round(draw)
        server.round = server.draws = draw + 1
        assert len(seen) == 2 and m.strategy["applied"] in ("agent", "reference")
        chosen = seen[0] if m.strategy["applied"] == "agent" else seen[1]
        assert all(torch.equal(server.global_state[k], chosen[k]) for k in server.global_state)
        steps = {int(s["step"]) for s in server.optimizer.state_dict()["state"].values()}
        assert steps == {draw + 1}
        if m.strategy["applied"] == "agent":  # metrics record the weights of the update applied
            assert m.weights == pytest.approx([m.strategy["agent_weights"][c] for c in m.clients])
    held_out = {c.id for c in load_manifest_lazy(tmp_path / "held_out.jsonl.gz")}
    dev = {c.id for c in load_manifest_lazy(tmp_path / "dev_model_selection.jsonl.gz")}
    assert len(held_out) == 3 and dev and not held_out & dev


def test_resume_with_agent_state_is_bitwise_identical(fl_data, tmp_path):
    """3 rounds straight, against 1 round then a fresh process-like restart to 3: the model,
    the agent (weights, Adam, replay memory, feature statistics) and every round's
    decisions are identical. TensorBoard has the reward, exploration, agent loss and weights."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fl_lib.fl.train import train

    fast = [*FAST, "clients_per_round=2", "validate_every=3"]
    straight = train(FLConfig.from_yaml(CONF, [*fast, "rounds=3"]), output_dir=tmp_path / "a", **fl_data)
    train(FLConfig.from_yaml(CONF, [*fast, "rounds=1"]), output_dir=tmp_path / "b", **fl_data)
    resumed = train(FLConfig.from_yaml(CONF, [*fast, "rounds=3"]), output_dir=tmp_path / "b", **fl_data)
    assert all(torch.equal(straight.global_state[k], resumed.global_state[k]) for k in straight.global_state)
    a, b = straight.strategy.state_dict(), resumed.strategy.state_dict()
    assert len(a["memory"]) == 3 and a["rounds_seen"] == b["rounds_seen"] == 3
    for x, y in zip(a["memory"], b["memory"]):
        assert torch.equal(x["z"], y["z"]) and torch.equal(x["da"], y["da"]) and x["reward"] == y["reward"]
    assert all(torch.equal(a["scorer"][k], b["scorer"][k]) for k in a["scorer"])
    assert torch.equal(a["feature_var"], b["feature_var"])
    assert all(torch.equal(a["prev_update"][k], b["prev_update"][k]) for k in a["prev_update"])
    assert a["agent_optimizer"]["state"][0]["step"] == b["agent_optimizer"]["state"][0]["step"] == 3 * 4

    def rows(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    keep = ("round", "train_loss", "clients", "weights", "strategy")  # not timings; b also validated its last round 1
    assert [{k: r[k] for k in keep} for r in rows(tmp_path / "a")] == [{k: r[k] for k in keep} for r in rows(tmp_path / "b")]
    events = EventAccumulator(str(tmp_path / "a" / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"strategy/reward", "strategy/explore_std", "strategy/agent_loss"} <= tags
    assert {f"strategy/agent_weights/{c}" for r in rows(tmp_path / "a") for c in r["clients"]} <= tags
