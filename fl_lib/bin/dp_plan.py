"""ε of a planned private deployment, by RDP and PLD side by side (fl_lib/fl/privacy.py).

Keep the noise per coordinate that a dev run tolerated (σ₀·C/K₀) and ask what ε a larger
population with larger cohorts would spend, as Apple's federated-ASR paper does:

    python -m fl_lib.bin.dp_plan --population 1000000 --cohort 1000 --rounds 2000 --delta 1e-9 \\
        --same_noise_as 0.5 8          # σ₀ = 0.5 with cohorts of K₀ = 8: σ = 0.5 · 1000 / 8
    python -m fl_lib.bin.dp_plan --population 1000000 --cohort 1000 --rounds 2000 --noise_multiplier 60
"""
from __future__ import annotations

import argparse
import json


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--population", type=int, required=True, help="N: clients that could be sampled")
    p.add_argument("--cohort", type=int, required=True, help="K: clients per round (the expected number under Poisson sampling)")
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--delta", type=float, default=None, help="default 1/N^1.1")
    noise = p.add_mutually_exclusive_group(required=True)
    noise.add_argument("--noise_multiplier", type=float, help="σ: noise std σ·C on the round's sum")
    noise.add_argument("--same_noise_as", type=float, nargs=2, metavar=("SIGMA0", "COHORT0"),
                       help="keep a run's noise per coordinate σ₀·C/K₀: σ = σ₀ · K / K₀")
    args = p.parse_args(argv)
    if not 1 <= args.cohort <= args.population or args.rounds < 1:
        p.error("need 1 <= cohort <= population and rounds >= 1")
    from fl_lib.fl.privacy import plan

    sigma = args.noise_multiplier if args.noise_multiplier is not None else args.same_noise_as[0] * args.cohort / args.same_noise_as[1]
    delta = args.delta if args.delta is not None else 1.0 / args.population**1.1
    print(json.dumps(plan(args.population, args.cohort, args.rounds, delta, sigma), indent=1))


if __name__ == "__main__":
    main()
