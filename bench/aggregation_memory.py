"""Server memory must not grow with K: aggregation streams client results; the robust rules,
which need every update at once, grow by their stated K·d·4 bytes and no more.

For each K (clients per round) a FRESH subprocess builds a real ESPnet ASR model
(a 9.3M-parameter conformer by default), a real `FederatedServer` around it, and
replaces only the server's local trainer by one that returns synthetic results:
each client's pseudo-gradient is Δ_k = start − (start + noise_k), made when the
server asks for it and dropped by the server after `strategy.add`, exactly as
`LocalTrainer.train` would hand it over. The real `run_round` then streams the
K results through the strategy, aggregates and takes the server-optimizer step.
Peak RSS (ru_maxrss) of each subprocess is compared between K=small and K=large.

    .venv/bin/python bench/aggregation_memory.py                    # DGA, K=4 vs K=64
    .venv/bin/python bench/aggregation_memory.py --strategy fedavg --k_large 128
    .venv/bin/python bench/aggregation_memory.py --strategy median --k_large 16

Prints one JSON line. Target: streaming rules, ratio <= 1.10; robust rules, the growth from
K small to K large at most 1.25 x their stated memory_bytes difference.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FL_CONFS = {  # strategy -> (the recipe's config, overrides)
    "dga": ("fl_dga.yaml", []), "rl_dga": ("fl_rl_dga.yaml", []), "fedavg": ("fl_fedavg.yaml", []), "bmuf": ("fl_bmuf.yaml", []),
    "fedprox": ("fl_fedprox.yaml", []),
}
ROBUST_KEYS = {"trimmed_mean": ["strategy.trim_fraction=0.25"], "krum": ["strategy.num_byzantine=1"],
               "centered_clipping": ["strategy.clip_radius=1.0"]}
for _rule in ("median", "trimmed_mean", "krum", "geometric_median", "centered_clipping", "norm_bounding"):
    FL_CONFS[_rule] = ("fl_fedadam.yaml", [f"strategy.name={_rule}", "strategy.weight_by=null", "strategy.memory_limit_mb=1000000",
                                           *ROBUST_KEYS.get(_rule, [])])


class SyntheticClients:
    """Stands in for `LocalTrainer`: same `train` signature, same `ClientResult` out."""

    def __init__(self, noise: float, seed: int, hold: bool = False) -> None:
        self.noise = noise
        self.seed = seed
        self.calls = 0
        self.held = [] if hold else None  # negative control: a server that keeps every result

    def train(self, client_id, manifest, start, round_idx, proximal_mu=0.0, lr_scale=1.0):
        import torch

        from fl_lib.fl.strategies.base import ClientResult

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + round_idx * 10_007 + self.calls)
        self.calls += 1
        delta = {}
        s1 = s2 = 0.0
        n = 0
        for name, w in start.items():
            if not w.is_floating_point():
                continue
            local = w + self.noise * torch.randn(w.shape, generator=g, dtype=w.dtype)  # the "trained" client model
            d = w - local
            del local
            delta[name] = d
            s1 += float(d.double().sum())
            s2 += float(d.double().square().sum())
            n += d.numel()
        mean = s1 / n
        if self.held is not None:
            self.held.append(delta)
        return ClientResult(
            client_id=client_id,
            delta=delta,
            num_utts=10 + self.calls % 7,
            num_tokens=300 + 11 * (self.calls % 5),
            num_frames=10_000 + 37 * self.calls,
            train_loss=50.0 + (self.calls % 5),
            grad_mean=mean,
            grad_rms=(s2 / n) ** 0.5,
            grad_var=s2 / n - mean * mean,
            num_steps=1,
        )


def synthetic_held_out(vocab: int, utts: int = 4, seconds: float = 2.0):
    """rl_dga's held-out set for the bench: noise audio with random transcripts (the bench
    measures memory and time, not accuracy). Fixed by a seed, as real held-out data is."""
    import torch

    g = torch.Generator().manual_seed(0)
    n = int(16000 * seconds)
    batch = {
        "speech": torch.randn(utts, n, generator=g) * 0.1,
        "speech_lengths": torch.full((utts,), n),
        "text": torch.randint(2, vocab - 1, (utts, 12), generator=g),
        "text_lengths": torch.full((utts,), 12),
    }
    return lambda: [([f"utt{i}" for i in range(utts)], batch)]


class NoBatches:
    """The server's batch spec; the synthetic clients read no data and dev is off."""

    tokenizer = None

    def __call__(self, manifest, seed):
        raise AssertionError("synthetic clients load no data")


def child(opts: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from fl_lib.asr.model import build_asr_args, build_asr_model
    from fl_lib.fl.config import FLConfig
    from fl_lib.data.clients import ClientInfo
    from fl_lib.fl.server import FederatedServer

    tmp = Path(opts.tmp)
    if opts.asr_config:
        asr_config, tokens = Path(opts.asr_config), Path(opts.token_list)
    else:
        asr_config, tokens = common.write_bench_model_files(tmp / "model")
    args = build_asr_args(asr_config, tokens, None, None)
    model = build_asr_model(args)
    params = sum(p.numel() for p in model.parameters())
    yaml_name, overrides = FL_CONFS[opts.strategy]
    conf = FLConfig.from_yaml(common.CONF_DIR / yaml_name, [*overrides, f"clients_per_round={opts.k}", f"rounds={opts.rounds}"])
    clients = [ClientInfo(f"spk{i:04d}", 10, 0.0, tmp / f"spk{i:04d}.jsonl.gz") for i in range(opts.k)]
    held_out = synthetic_held_out(len(args.token_list)) if opts.strategy == "rl_dga" else None
    server = FederatedServer(model, args, conf, clients, NoBatches(), None, tmp / "exp", 0, held_out_batches=held_out)
    synthetic = SyntheticClients(opts.noise, seed=0, hold=opts.hold_results)
    server.clients_executor.trainer = synthetic  # the serial executor calls trainer.train(*task)
    before_mb = common.peak_rss_mb()
    current_before = common.current_rss_mb()
    t0 = time.perf_counter()
    for r in range(opts.rounds):
        m = server.run_round(r)
        assert len(m.clients) == opts.k and not m.dropped and not m.failed, m
    seconds = time.perf_counter() - t0
    floats = sum(v.numel() for v in server.global_state.values() if v.is_floating_point())
    stated = getattr(server.strategy, "memory_bytes", None)
    print(
        json.dumps(
            {
                "k": opts.k,
                "params": params,
                "stated_mb": None if stated is None else stated(opts.k, floats) / 2**20,
                "peak_rss_mb": common.peak_rss_mb(),
                "peak_rss_before_rounds_mb": before_mb,
                "rss_before_rounds_mb": current_before,
                "rss_after_rounds_mb": common.current_rss_mb(),
                "seconds": seconds,
            }
        )
    )


def measure(opts: argparse.Namespace, k: int, tmp: str) -> dict:
    cmd = [
        sys.executable, __file__, "--_child", "--k", str(k), "--strategy", opts.strategy, "--rounds", str(opts.rounds),
        "--noise", str(opts.noise), "--tmp", tmp,
    ]
    if opts.hold_results:
        cmd.append("--hold_results")
    if opts.asr_config:
        cmd += ["--asr_config", opts.asr_config, "--token_list", opts.token_list]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k_small", type=int, default=4, help="clients per round of the baseline run")
    p.add_argument("--k_large", type=int, default=64, help="clients per round of the compared run")
    p.add_argument("--strategy", choices=sorted(FL_CONFS), default="dga",
                   help="the recipe's fl_<strategy>.yaml; a robust rule runs with fl_fedadam.yaml")
    p.add_argument("--rounds", type=int, default=2, help="rounds per process (2: includes server-optimizer state)")
    p.add_argument("--noise", type=float, default=1e-3, help="std of the synthetic client update")
    p.add_argument("--repeats", type=int, default=1, help="processes per K; the max peak of them is used")
    p.add_argument(
        "--hold_results", action="store_true",
        help="negative control: keep every client delta alive, as a non-streaming server would (ratio must blow up)",
    )
    p.add_argument("--asr_config", help="ESPnet ASR yaml (default: a bench-local 9.3M-parameter conformer)")
    p.add_argument("--token_list", help="token list for --asr_config")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts._child:
        child(opts)
        return
    if bool(opts.asr_config) != bool(opts.token_list):
        p.error("--asr_config and --token_list go together")
    with tempfile.TemporaryDirectory(prefix="agg_mem_") as tmp:
        runs = {opts.k_small: [], opts.k_large: []}
        for _ in range(opts.repeats):  # alternate, so a noisy neighbour hits both
            for k in runs:
                runs[k].append(measure(opts, k, tmp))
    small = max(r["peak_rss_mb"] for r in runs[opts.k_small])
    large = max(r["peak_rss_mb"] for r in runs[opts.k_large])
    base = runs[opts.k_small][0]
    state_mb = base["params"] * 4 / 2**20
    growth = {k: max(r["peak_rss_mb"] for r in runs[k]) - runs[k][0]["peak_rss_before_rounds_mb"] for k in runs}
    robust = {}
    if base["stated_mb"] is not None:  # a rule that holds the round's rows: growth against its statement
        stated = runs[opts.k_large][0]["stated_mb"] - base["stated_mb"]
        measured = growth[opts.k_large] - growth[opts.k_small]
        robust = {"stated_extra_mb": round(stated, 1), "measured_extra_mb": round(measured, 1),
                  "measured_over_stated": round(measured / stated, 3), "target_over_stated": 1.25}
    common.emit(
        {
            **robust,
            "params": base["params"],
            f"rss_mb_k{opts.k_small}": round(small, 1),
            f"rss_mb_k{opts.k_large}": round(large, 1),
            "ratio": round(large / small, 4),
            "strategy": opts.strategy,
            "rounds": opts.rounds,
            "model_state_mb": round(state_mb, 1),
            f"round_growth_mb_k{opts.k_small}": round(growth[opts.k_small], 1),
            f"round_growth_mb_k{opts.k_large}": round(growth[opts.k_large], 1),
            **({} if robust else {"target_ratio": 1.10}),
        }
    )


if __name__ == "__main__":
    main()
