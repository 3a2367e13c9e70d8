"""Stage 5 over Flower: the same federated training as `fl_train`, its clients on SuperNodes.

    python -m fl_lib.bin.flower_train --nodes 2 --asr_config conf/train_asr_rnn_small.yaml \\
        --fl_config conf/fl_dga.yaml --train_clients data/clients/train-clean-100/clients.jsonl \\
        --dev_cuts data/sets/dev-clean.jsonl.gz --token_list data/token_list/char/tokens.txt \\
        --bpemodel data/token_list/char/bpe.model --output_dir exp/fl_dga_flower rounds=20

The clients are split over `--nodes` SuperNodes (`<output_dir>/flower/node<i>/clients.jsonl`,
client j in id order on node j mod N). A SuperLink and the SuperNodes start as separate
processes on 127.0.0.1, `flwr run` submits fl_lib's ServerApp and ClientApp, and every
process is stopped when the run ends. The server is fl_lib's own (strategies, server
optimizer, checkpoints, metrics.jsonl, RESULTS conventions): re-running the same command
resumes from the last completed round. Logs: `<output_dir>/flower/logs/`.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from fl_lib.bin.fl_train import get_parser as fl_train_parser
from fl_lib.log import setup_logging

logger = logging.getLogger("flower_train")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[fl_train_parser()], add_help=False, conflict_handler="resolve")
    p.add_argument("--nodes", type=int, default=2, help="SuperNodes, each holding its share of the clients")
    p.add_argument("--engine", choices=("grpc", "simulation"), default="grpc",
                   help="grpc: SuperNodes as separate processes; simulation: Flower's simulation engine (Ray actors)")
    p.add_argument("--node_trainer", choices=("resident", "per_message"), default=None,
                   help="grpc: each SuperNode's trainer imports ESPnet once and trains every message (resident, the "
                        "default), or each message's ClientApp process builds its own (per_message, Flower's plain way)")
    p.add_argument("--round_timeout", type=float, default=3600.0,
                   help="seconds the server waits for a round's replies; a client not answered by then fails")
    p.add_argument("--startup_timeout", type=float, default=300.0,
                   help="seconds the launcher waits for the SuperLink and the nodes' resident trainers to be up, and "
                        "the server for the SuperNodes to connect and list their clients")
    for name in ("--client_jobs", "--ngpu", "--dist_timeout"):  # fl_train options that mean nothing here
        p.add_argument(name, help=argparse.SUPPRESS, default=None)
    return p


def main(argv=None) -> None:
    args = get_parser().parse_args(argv)
    for name in ("client_jobs", "ngpu", "dist_timeout"):
        if getattr(args, name) is not None:
            raise SystemExit(f"flower_train: --{name} is an fl_train option; over Flower each SuperNode trains its clients")
    if args.engine == "simulation" and args.node_trainer is not None:
        raise SystemExit("flower_train: --node_trainer is for --engine grpc; the simulation engine's actors keep their imports")
    setup_logging()
    from fl_lib.fl.config import FLConfig
    from fl_lib.flower.deployment import LocalDeployment, split_nodes, write_app
    from fl_lib.flower.server_app import STATUS

    FLConfig.from_yaml(args.fl_config, args.overrides)  # a bad config fails here, before any process starts
    out = args.output_dir.resolve()
    flower = out / "flower"
    indexes = split_nodes(args.train_clients, args.nodes, flower)
    run_config = {
        "asr-config": str(args.asr_config.resolve()), "fl-config": str(args.fl_config.resolve()),
        "token-list": str(args.token_list.resolve()), "bpemodel": str(args.bpemodel.resolve()),
        "feats-stats": str(args.feats_stats.resolve()) if args.feats_stats else "",
        "dev-cuts": str(args.dev_cuts.resolve()) if args.dev_cuts else "",
        "output-dir": str(out), "seed": args.seed, "num-threads": args.num_threads,
        "overrides": shlex.join(args.overrides), "min-nodes": args.nodes, "round-timeout": args.round_timeout,
        "startup-timeout": args.startup_timeout,
        "nodes-dir": str(flower),
    }
    app_dir = write_app(flower / "app", run_config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flower_train.sh").write_text("#!/usr/bin/env bash\n# The command that ran (and resumes) this experiment.\n"
                                         + shlex.join([sys.executable, "-m", "fl_lib.bin.flower_train", *(argv or sys.argv[1:])]) + "\n")
    (out / STATUS).unlink(missing_ok=True)
    what = "its simulation engine with" if args.engine == "simulation" else "and"
    logger.info(f"Flower: a SuperLink on 127.0.0.1 {what} {args.nodes} SuperNodes; logs in {flower / 'logs'}")
    simulation = args.engine == "simulation"
    resident = not simulation and args.node_trainer != "per_message"
    with LocalDeployment(flower, indexes, simulation=simulation, startup_timeout=args.startup_timeout,
                         resident_trainer=resident) as deployment:
        rc = deployment.run(app_dir)
    status = json.loads((out / STATUS).read_text()) if (out / STATUS).exists() else {"status": "failed", "error": "no status written"}
    if rc != 0 or status["status"] != "finished":
        raise SystemExit(f"flower_train: the run failed (flwr run exit {rc}): {status.get('error')}; "
                         f"see {out / 'flower_server.log'} and {flower / 'logs'}")
    logger.info(f"Flower run finished: {status['rounds']} rounds in {out}")


if __name__ == "__main__":
    main()
