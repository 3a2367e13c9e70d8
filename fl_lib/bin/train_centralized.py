"""The centralized reference: the federated run's ESPnet model trained on the pooled clients' data.

    python -m fl_lib.bin.train_centralized --asr_config conf/train_asr_conformer_small.yaml \\
        --config conf/centralized.yaml --train_clients data/clients/train-clean-100/clients.jsonl \\
        --dev_cuts data/sets/dev-clean.jsonl.gz --token_list data/token_list/char/tokens.txt \\
        --bpemodel data/token_list/char/bpe.model --feats_stats exp/asr_stats/feats_stats.npz \\
        --budget_from exp/fl_dga_sgd_train_asr_conformer_small --output_dir exp/centralized

`--budget_from EXP` sets budget_cpu_seconds to that federated run's client CPU-seconds
(time.process_time of each client's local training, summed over workers and rounds), so
both are compared at equal training compute: this run stops when its own process has
spent as many CPU-seconds training. A rerun into the same --output_dir resumes it.
Trailing `key=value` arguments override the config.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fl_lib.log import setup_logging


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--asr_config", type=Path, required=True, help="ESPnet ASR training YAML (model)")
    p.add_argument("--config", type=Path, default=None, help="centralized training YAML (lr, warmup, budget)")
    p.add_argument("--train_clients", type=Path, required=True, help="clients.jsonl from stage 2; their cuts are pooled")
    p.add_argument("--dev_cuts", type=Path, default=None)
    p.add_argument("--token_list", type=Path, required=True)
    p.add_argument("--bpemodel", type=Path, required=True)
    p.add_argument("--feats_stats", type=Path, default=None, help="feats_stats.npz from stage 3 (global_mvn)")
    p.add_argument("--budget_from", type=Path, default=None, help="a federated exp dir whose client CPU-seconds are the budget")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=2, help="torch intra-op threads (the cores FL's client_jobs use)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    return p


def main(argv=None) -> None:
    args = get_parser().parse_args(argv)
    setup_logging()
    from fl_lib.asr.centralized import (CentralizedConfig, federated_best_criterion, federated_client_cpu_seconds,
                                       train_centralized)
    from fl_lib.fl.checkpoint import CheckpointError

    overrides = list(args.overrides)
    if args.budget_from is not None:
        if any(o.startswith("budget_cpu_seconds=") for o in overrides):
            raise ValueError("give either --budget_from or budget_cpu_seconds=, not both")
        seconds = federated_client_cpu_seconds(args.budget_from)
        logging.getLogger(__name__).info(f"budget: {seconds:.1f} CPU-s, the client CPU-seconds of {args.budget_from}")
        overrides.append(f"budget_cpu_seconds={seconds:.6f}")
    conf = CentralizedConfig.from_yaml(args.config, overrides)
    if args.budget_from is not None and conf.best_criterion != (fl := federated_best_criterion(args.budget_from)):
        raise SystemExit(f"train_centralized: {args.budget_from} ranks its rounds by best_criterion {fl}, this reference "
                         f"by {conf.best_criterion}: give best_criterion={fl}, so both keep and average by one criterion")
    try:
        train_centralized(
            conf, asr_config=args.asr_config, train_clients=args.train_clients, dev_cuts=args.dev_cuts,
            token_list=args.token_list, bpemodel=args.bpemodel, feats_stats=args.feats_stats,
            output_dir=args.output_dir, seed=args.seed, num_threads=args.num_threads,
        )
    except CheckpointError as e:  # another experiment's or a damaged checkpoint.pth: the message says which and why
        raise SystemExit(f"train_centralized: {e}") from None


if __name__ == "__main__":
    main()
