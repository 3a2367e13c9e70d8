"""Stage 5: federated training of a stock ESPnet ASR model, one client per speaker.

    python -m fl_lib.bin.fl_train --asr_config conf/train_asr_rnn_small.yaml \\
        --fl_config conf/fl_dga.yaml --train_clients data/clients/train-clean-100/clients.jsonl \\
        --dev_cuts data/sets/dev-clean.jsonl.gz --token_list data/token_list/char/tokens.txt \\
        --bpemodel data/token_list/char/bpe.model --feats_stats exp/asr_stats/feats_stats.npz \\
        --output_dir exp/fl_dga rounds=20 strategy.beta=2

Trailing `key=value` arguments override the federated config (dotted keys).
Re-running the same command resumes from the last completed round. SIGTERM (a scheduler's
preemption, `kill`) stops the run cleanly: the write in progress removes its temporary file,
the exit status is 143, and the same command resumes as after any interruption.
A run whose model diverged (`max_failed_rounds` draws in a row that fell short of
`min_clients_per_round` only by clients with a non-finite loss, gradient or pseudo-gradient,
none raising) exits with status 3 (EXIT_DIVERGED) rather than 1, the status of the other
failures it reports: a study can record a divergence as a result (bench/robustness.py) and still
stop on a bug. (Under torchrun, torchrun's own status reports a failed rank.)

Under `torchrun --nproc_per_node N` (or `--nnodes`/`--rdzv_*` across machines)
each rank trains a share of every round's clients; rank 0 writes the results.
A rank that raises fails the job: torchrun stops the others and reports its error.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from fl_lib.log import setup_logging
from fl_lib.terminate import EXIT_STATUS, Terminated, sigterm_raises

EXIT_DIVERGED = 3


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--asr_config", type=Path, required=True, help="ESPnet ASR training YAML (model)")
    p.add_argument("--fl_config", type=Path, required=True, help="federated config YAML (rounds, strategy, optimizers)")
    p.add_argument("--train_clients", type=Path, required=True, help="clients.jsonl from stage 2")
    p.add_argument("--dev_cuts", type=Path, default=None, help="dev CutSet for validation")
    p.add_argument("--token_list", type=Path, required=True)
    p.add_argument("--bpemodel", type=Path, required=True)
    p.add_argument("--feats_stats", type=Path, default=None, help="feats_stats.npz from stage 3 (global_mvn)")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--client_jobs", type=int, default=1, help="worker processes that train a round's clients in parallel")
    p.add_argument("--ngpu", type=int, default=0, help="GPUs per process, 0 or 1; 1 without CUDA is an error")
    p.add_argument("--dist_timeout", type=float, default=1800.0,
                   help="seconds a torchrun rank waits in a collective before failing; ranks meet once per round, so "
                        "it must exceed a round's client training plus rank 0's validation and checkpoint writes")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the federated config")
    return p


@record
def main(argv=None) -> None:
    args = get_parser().parse_args(argv)
    setup_logging()
    from fl_lib.fl.config import FLConfig
    from fl_lib.fl.distributed import init_from_env, resolve_device
    from fl_lib.fl.checkpoint import CheckpointError
    from fl_lib.fl.server import ClientFailuresError, RanksDisagreeError, RoundCoverageError, RoundsFailedError
    from fl_lib.fl.train import train

    conf = FLConfig.from_yaml(args.fl_config, args.overrides)
    try:
        resolve_device(args.ngpu, int(os.environ.get("LOCAL_RANK", "0")))  # before joining a process group: no NCCL without a GPU
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"fl_train: {e}") from None
    ranks = init_from_env(args.ngpu, args.dist_timeout)
    if not ranks.is_main:  # rank 0 logs the run; the others only their warnings and errors
        logging.getLogger().setLevel(logging.WARNING)
    try:
        with sigterm_raises():
            train(
                conf,
                asr_config=args.asr_config,
                train_clients=args.train_clients,
                dev_cuts=args.dev_cuts,
                token_list=args.token_list,
                bpemodel=args.bpemodel,
                feats_stats=args.feats_stats,
                output_dir=args.output_dir,
                seed=args.seed,
                num_threads=args.num_threads,
                client_jobs=args.client_jobs,
                ngpu=args.ngpu,
                ranks=ranks,
                command=[sys.executable, "-m", "fl_lib.bin.fl_train", *(argv or sys.argv[1:])],
            )
    # Exit with the message (the file, the clients, the first traceback), not the server's stack.
    except RoundsFailedError as e:
        if not e.diverged:
            raise SystemExit(f"fl_train: {e}") from None
        print(f"fl_train: the model diverged: {e}", file=sys.stderr)
        raise SystemExit(EXIT_DIVERGED) from None
    except (ClientFailuresError, CheckpointError, RanksDisagreeError, RoundCoverageError) as e:
        raise SystemExit(f"fl_train: {e}") from None
    except Terminated:
        logging.getLogger(__name__).error(
            f"fl_train: stopped by SIGTERM; the rounds checkpointed in {args.output_dir} are kept: rerun the same command to resume")
        raise SystemExit(EXIT_STATUS) from None
    finally:
        if ranks.distributed:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
