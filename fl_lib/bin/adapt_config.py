"""Check an adaptation config (with overrides), save it into the experiment, print keys.

    python -m fl_lib.bin.adapt_config --config conf/adapt.yaml --save exp/adapt/adapt_config.json \\
        --get generations,labels filter=threshold threshold=0.8

prints the values of the keys given, one per line, in their order. run.sh calls it before any
decoding, so a bad config fails first.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--save", type=Path, default=None, help="write the resolved config here (JSON)")
    p.add_argument("--get", default=None, help="comma-separated keys: print their values, one per line")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    args = p.parse_args(argv)
    from fl_lib.adapt.config import AdaptConfig

    conf = AdaptConfig.from_yaml(args.config, args.overrides).to_dict()
    if args.save is not None:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(conf, indent=2) + "\n")
    if args.get is not None:
        keys = args.get.split(",")
        unknown = [k for k in keys if k not in conf]
        if unknown:
            raise SystemExit(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(conf)}")
        for k in keys:
            print(conf[k])


if __name__ == "__main__":
    main()
