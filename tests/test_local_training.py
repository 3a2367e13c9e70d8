"""Client side of a round on toy models: FedProx's proximal term and the pseudo-gradient statistics."""
import math

import numpy as np
import pytest
import torch

from fl_lib.fl.client import LocalTrainer, ProximalModel, pseudo_gradient, trained_entries
from fl_lib.fl.config import ClientConfig


class Toy(torch.nn.Module):
    """Loss ½‖w − target‖², the target read from the batch; `frozen` is not trained."""

    def __init__(self, w) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))
        self.frozen = torch.nn.Parameter(torch.tensor([5.0]), requires_grad=False)

    def forward(self, speech, speech_lengths, **_):
        loss = 0.5 * (self.w - speech[0]).square().sum()
        return loss, {"loss": loss.detach()}, torch.tensor(1.0)


def test_proximal_term_value_and_gradient_hand_computed():
    mu, w, w_global, target = 0.2, [1.0, -2.0], [0.5, 1.0], [0.0, 0.0]
    model = Toy(w)
    anchor = {"w": torch.tensor(w_global), "frozen": torch.tensor([0.0])}  # frozen is 5 away: must not count
    net = ProximalModel(model, anchor, mu)
    batch = {"speech": torch.tensor([target]), "speech_lengths": torch.tensor([1])}
    data_loss = 0.5 * (1.0**2 + 2.0**2)
    prox = mu / 2 * ((1.0 - 0.5) ** 2 + (-2.0 - 1.0) ** 2)  # 0.1 · 9.25
    for _ in range(2):  # each forward adds the term once, not once more per call
        loss, stats, _ = net(**batch)
        assert loss.item() == pytest.approx(data_loss + prox)
        assert stats["loss"].item() == pytest.approx(data_loss)  # ESPnet's stats stay the data loss
    model.zero_grad()
    loss.backward()
    # ∂/∂w = (w − target) + μ·(w − w_global)
    assert model.w.grad.tolist() == pytest.approx([1.0 + mu * 0.5, -2.0 + mu * -3.0])
    assert model.frozen.grad is None


def test_fedprox_once_per_step_with_espnet_accum_grad():
    """ESPnet divides every forward's loss by accum_grad: two forwards per step add μ/2‖·‖² once."""
    from fl_lib.espnet_env import asr_task

    w0, target, lr, mu = [1.0, -1.0], [3.0, 2.0], 0.5, 0.4
    batch = {"speech": torch.tensor([target]), "speech_lengths": torch.tensor([160]), "text_lengths": torch.tensor([3])}
    conf = ClientConfig(optim="sgd", lr=lr, grad_clip=1e9, accum_grad=2, max_steps=2)
    model = Toy(w0)
    trainer = LocalTrainer(model, asr_task().get_parser().parse_args([]), conf, lambda manifest, seed: [(["u"], batch)] * 4, seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = trainer.train("c", "toy", start, round_idx=0, proximal_mu=mu)
    # Step 1 starts at w_global: no pull. w1 = w0 − lr·(w0 − t) = [2, 0.5]
    # Step 2: g = (w1 − t) + μ·(w1 − w0) = [−1, −1.5] + [0.4, 0.6]; w2 = w1 − lr·g = [2.3, 0.95]
    # (μ counted twice per step would give [2.1, 0.65]; not at all, [2.5, 1.25].)
    assert model.w.tolist() == pytest.approx([2.3, 0.95])
    assert result.delta["w"].tolist() == pytest.approx([1.0 - 2.3, -1.0 - 0.95])
    assert (result.num_steps, result.num_utts, result.num_frames) == (2, 4, 4)  # 4 batches, 2 optimizer steps
    assert result.num_tokens == 12  # 3 target tokens in each of the 4 batches


def test_pseudo_gradient_and_statistics_hand_computed():
    """Δ covers what training changes: the trainable parameters and BatchNorm's running statistics.
    A frozen parameter and a constant buffer (as ESPnet's mel filterbank) are the server's alone."""
    model = Toy([0.0, 0.0])
    model.norm = torch.nn.BatchNorm1d(1)  # running statistics: in Δ, not in the statistics
    model.register_buffer("melmat", torch.tensor([2.0]))  # a constant float buffer: not in Δ
    model.register_buffer("count", torch.tensor(7))  # integer buffer: not averaged at all
    start = {"w": torch.tensor([1.0, 3.0]), "frozen": torch.tensor([5.0]), "melmat": torch.tensor([10.0]),
             "count": torch.tensor(9), "norm.weight": torch.tensor([1.0]), "norm.bias": torch.tensor([0.0]),
             "norm.running_mean": torch.tensor([0.5]), "norm.running_var": torch.tensor([3.0])}
    with torch.no_grad():
        model.w.copy_(torch.tensor([2.0, -1.0]))
        model.frozen.copy_(torch.tensor([4.0]))
    assert trained_entries(model) == ["w", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var"]
    delta, stats, finite = pseudo_gradient(start, model)
    assert list(delta) == trained_entries(model)
    assert delta["w"].tolist() == [-1.0, 4.0] and delta["norm.running_mean"].tolist() == [0.5]
    assert delta["norm.running_var"].tolist() == [2.0] and delta["norm.weight"].tolist() == [0.0]
    d = np.array([-1.0, 4.0, 0.0, 0.0])  # the trainable entries: w, and the BatchNorm's weight and bias
    assert stats["grad_mean"] == pytest.approx(d.mean())
    assert stats["grad_rms"] == pytest.approx(math.sqrt((d**2).mean()))
    assert stats["grad_var"] == pytest.approx(d.var())  # population variance, not FLUTE's 0
    assert finite


def test_pseudo_gradient_constant_delta_has_zero_variance_and_nan_is_flagged():
    model = Toy([0.0, 0.0, 0.0])
    start = {"w": torch.tensor([0.5, 0.5, 0.5]), "frozen": torch.tensor([5.0])}
    _, stats, finite = pseudo_gradient(start, model)
    assert (stats["grad_mean"], stats["grad_rms"], stats["grad_var"], finite) == (0.5, 0.5, 0.0, True)
    start["w"][1] = math.nan
    assert pseudo_gradient(start, model)[2] is False


def test_asr_config_rejects_espnet_training_loop_keys(tmp_path):
    """A stock asr.sh config's optimizer/batch keys would do nothing under the federated loop: an error."""
    from fl_lib.asr.model import build_asr_args

    conf = tmp_path / "train_asr.yaml"
    conf.write_text("encoder: rnn\noptim: adam\noptim_conf: {lr: 0.002}\nbatch_bins: 1000000\n")
    with pytest.raises(ValueError, match=r"batch_bins, optim, optim_conf configure ESPnet's own training loop"):
        build_asr_args(conf, tmp_path / "tokens.txt", None, None)


def _toy_trainer(model, conf, batches):
    from fl_lib.espnet_env import asr_task

    return LocalTrainer(model, asr_task().get_parser().parse_args([]), conf, lambda manifest, seed: batches[manifest], seed=0)


def test_no_gradient_leaks_into_the_next_client():
    """accum_grad=2 and 3 batches: ESPnet leaves the third batch's gradient unstepped. The next
    client on the same model object must train exactly as it would on a fresh one."""
    conf = ClientConfig(optim="sgd", lr=0.5, grad_clip=1e9, accum_grad=2)

    def batch(target):
        return (["u"], {"speech": torch.tensor([target]), "speech_lengths": torch.tensor([160]), "text_lengths": torch.tensor([1])})

    batches = {"a": [batch([9.0, -9.0])] * 3, "b": [batch([1.0, 2.0])] * 2}
    start = {"w": torch.tensor([0.0, 0.0]), "frozen": torch.tensor([5.0])}
    shared = _toy_trainer(Toy([0.0, 0.0]), conf, batches)
    shared.train("a", "a", start, round_idx=0)
    after_a = shared.train("b", "b", start, round_idx=0)
    alone = _toy_trainer(Toy([0.0, 0.0]), conf, batches).train("b", "b", start, round_idx=0)
    # One step on b from w = 0: g = w − t = −[1, 2] (averaged over 2 batches), w = [0.5, 1]
    assert alone.delta["w"].tolist() == pytest.approx([-0.5, -1.0])
    assert torch.equal(after_a.delta["w"], alone.delta["w"])


def test_a_client_whose_every_step_is_invalid_is_flagged():
    """ESPnet skips each step with a non-finite gradient norm; the client then returns Δ = 0 with a
    finite loss, which only ESPnet's `all_steps_are_invalid` tells apart from a converged client."""
    conf = ClientConfig(optim="sgd", lr=0.5, accum_grad=1)
    batches = {"c": [(["u"], {"speech": torch.tensor([[1.0, 1.0]]), "speech_lengths": torch.tensor([160]), "text_lengths": torch.tensor([1])})] * 2}
    model = Toy([0.0, 0.0])
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _toy_trainer(model, conf, batches)
    assert not trainer.train("c", "c", start, round_idx=0).all_steps_invalid
    model.w.register_hook(lambda g: torch.full_like(g, math.inf))
    result = trainer.train("c", "c", start, round_idx=0)
    assert result.all_steps_invalid and result.is_finite() and result.delta["w"].tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "line",
    ["train_dtype: float16", "cleaner: tacotron", "speech_volume_normalize: 0.9", "rir_scp: data/rirs.scp", "use_preprocessor: false", "seed: 3"],
)
def test_asr_config_rejects_keys_only_espnet_main_worker_applies(tmp_path, line):
    """ESPnet applies these only in AbsTask.main_worker or its data pipeline, which never run here."""
    from fl_lib.asr.model import build_asr_args

    conf = tmp_path / "train_asr.yaml"
    conf.write_text(f"encoder: rnn\n{line}\n")
    key = line.split(":")[0]
    with pytest.raises(ValueError, match=rf"{key} take effect only inside ESPnet's AbsTask.main_worker"):
        build_asr_args(conf, tmp_path / "tokens.txt", None, None)


def test_asr_config_keys_at_espnet_defaults_are_harmless(tmp_path):
    """ESPnet's own config.yaml lists every key; one at its default value changes nothing."""
    from fl_lib.asr.model import build_asr_args

    conf = tmp_path / "train_asr.yaml"
    conf.write_text("encoder: rnn\ncleaner: null\ntrain_dtype: float32\n")
    (tmp_path / "tokens.txt").write_text("<blank>\n<unk>\na\n<sos/eos>\n")
    assert build_asr_args(conf, tmp_path / "tokens.txt", None, None).encoder == "rnn"


def test_client_lr_warmup_and_round_scale_hand_computed():
    """SGD on ½‖w − t‖² from w = 0, t = [4, 8]: each step moves w by lr_s·(t − w).
    warmup_steps=2 gives lr_s = lr·[½, 1, 1]; lr_scale multiplies every step."""
    def batch():
        return (["u"], {"speech": torch.tensor([[4.0, 8.0]]), "speech_lengths": torch.tensor([160]), "text_lengths": torch.tensor([1])})

    start = {"w": torch.tensor([0.0, 0.0]), "frozen": torch.tensor([5.0])}

    def final_w(warmup_steps, lr_scale):
        conf = ClientConfig(optim="sgd", lr=0.5, grad_clip=1e9, warmup_steps=warmup_steps)
        trainer = _toy_trainer(Toy([0.0, 0.0]), conf, {"c": [batch()] * 3})
        return (-trainer.train("c", "c", start, round_idx=0, lr_scale=lr_scale).delta["w"]).tolist()

    def by_hand(lrs):
        w = np.zeros(2)
        for lr in lrs:
            w = w + lr * (np.array([4.0, 8.0]) - w)
        return w.tolist()

    assert final_w(0, 1.0) == pytest.approx(by_hand([0.5, 0.5, 0.5]))
    assert final_w(2, 1.0) == pytest.approx(by_hand([0.25, 0.5, 0.5]))
    assert final_w(2, 0.5) == pytest.approx(by_hand([0.125, 0.25, 0.25]))
    # Each client round starts its warmup afresh: a second round on the same trainer repeats it.
    conf = ClientConfig(optim="sgd", lr=0.5, grad_clip=1e9, warmup_steps=2)
    trainer = _toy_trainer(Toy([0.0, 0.0]), conf, {"c": [batch()] * 3})
    first = trainer.train("c", "c", start, round_idx=0).delta["w"]
    assert torch.equal(trainer.train("c", "c", start, round_idx=1).delta["w"], first)


def test_client_schedule_errors_name_the_client_key():
    from fl_lib.fl.config import FLConfig

    with pytest.raises(ValueError, match=r"client.schedule.gamma=0.5 does nothing with decay: none"):
        FLConfig.from_yaml(None, ["client.schedule.gamma=0.5"])
    with pytest.raises(ValueError, match=r"client.warmup_steps must be >= 0"):
        FLConfig.from_yaml(None, ["client.warmup_steps=-1"])
    conf = FLConfig.from_yaml(None, ["client.schedule.decay=exponential", "client.schedule.gamma=0.9"])
    assert conf.client.schedule.gamma == 0.9


def test_mixed_precision_on_the_cpu_is_an_error():
    """client.use_amp is GPU mixed precision; on a CPU model it must stop, not run in fp32 silently."""
    with pytest.raises(ValueError, match="client.use_amp is mixed precision on the GPU: it needs --ngpu 1"):
        _toy_trainer(Toy([0.0, 0.0]), ClientConfig(use_amp=True), {})
