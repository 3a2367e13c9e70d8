"""The Flower `ServerApp`: fl_lib's own federated server, with its clients on SuperNodes.

The round loop, sampling, strategies (FedAvg, DGA, BMUF, RL-DGA, the robust rules), server
optimizer, LR schedules, DP, checkpoints, `metrics.jsonl`, TensorBoard and resume are
`fl_lib.fl.server.FederatedServer`'s, unchanged. Flower replaces only the executor
(`federation.FlowerClients`): a round's tasks go to the nodes holding the sampled clients.
The round counter, server optimizer and strategy state live in fl_lib's
checkpoint, so a restarted ServerApp continues where it stopped instead of at Flower's round 1.

Run configuration (`[tool.flwr.app.config]`, written by `fl_lib.bin.flower_train`): the
`fl_train` options, with `-` for `_`.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .federation import discover

logger = logging.getLogger(__name__)
app = ServerApp()
STATUS = "flower_status.json"  # written last by the ServerApp: how the run ended, for the launcher


def run_args(context: Context) -> argparse.Namespace:
    """The run configuration as `fl_train` options."""
    cfg = {k.replace("-", "_"): v for k, v in context.run_config.items()}
    for key in ("feats_stats", "dev_cuts"):
        cfg[key] = Path(cfg[key]) if cfg.get(key) else None
    for key in ("asr_config", "fl_config", "token_list", "bpemodel", "output_dir"):
        cfg[key] = Path(cfg[key])
    cfg["overrides"] = shlex.split(cfg.get("overrides", ""))
    return argparse.Namespace(**cfg)


@app.main()
def main(grid: Grid, context: Context) -> None:
    from ..fl.config import FLConfig
    from ..fl.train import build_server
    from ..log import setup_logging

    a = run_args(context)
    a.output_dir.mkdir(parents=True, exist_ok=True)
    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request to the SuperLink otherwise
    handler = logging.FileHandler(a.output_dir / "flower_server.log")
    handler.setFormatter(logging.Formatter("%(asctime)s (%(module)s:%(lineno)d) %(levelname)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    status = {"status": "failed"}
    try:
        conf = FLConfig.from_yaml(a.fl_config, a.overrides)
        federation = discover(grid, int(a.min_nodes), float(a.startup_timeout), float(a.round_timeout))
        server = build_server(conf, asr_config=a.asr_config, token_list=a.token_list, bpemodel=a.bpemodel,
                              feats_stats=a.feats_stats, dev_cuts=a.dev_cuts, output_dir=a.output_dir, seed=int(a.seed),
                              num_threads=int(a.num_threads), remote=federation)
        server.fit()
        status = {"status": "finished", "rounds": server.round, "bytes_per_draw": federation.bytes_per_draw}
    except Exception as e:
        logger.exception("the Flower ServerApp failed")
        status["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        (a.output_dir / STATUS).write_text(json.dumps(status, indent=1) + "\n")
        logging.getLogger().removeHandler(handler)
