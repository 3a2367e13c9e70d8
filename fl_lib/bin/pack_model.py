"""Pack a decoded model for stock `Speech2Text` with ESPnet's packer (run.sh stage 7).

    python -m fl_lib.bin.pack_model --exp_dir exp/fl_fedavg --model valid.acc.best.pth \
        --inference_config conf/decode_asr_ctc_fusion.yaml \
        --lm_train_config exp/lm_train_lm_rnn/config.yaml --lm_file exp/lm_train_lm_rnn/valid.loss.best.pth \
        --outpath exp/fl_fedavg/fl_fedavg_valid.acc.best.zip

The zip holds ESPnet's meta.yaml, config.yaml, the model, the LM, the sentencepiece
model, tokens.txt, feats_stats.npz, RESULTS.md and decode.yaml, the decoding options:

    files = unpack("<zip>", "model", use_cache=False)   # espnet2.main_funcs.pack_funcs
    s2t = Speech2Text.from_pretrained(**files, **yaml.safe_load(open("model/decode.yaml")))
    text = s2t(soundfile.read("utt.wav")[0])[0][0]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fl_lib.bin import add_lm_options
from fl_lib.log import setup_logging


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp_dir", type=Path, required=True, help="holds config.yaml and the checkpoints")
    p.add_argument("--model", default="valid.acc.best.pth",
                   help="as fl_lib.bin.decode: best, latest, ave, valid.acc.ave[_<N>best].pth or a file in exp_dir")
    p.add_argument("--inference_config", type=Path, required=True,
                   help="the ESPnet decode yaml stage 6 decodes with; packed as decode.yaml")
    add_lm_options(p)
    p.add_argument("--outpath", type=Path, required=True, help="the .zip to write")
    p.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    setup_logging(args.log_level)
    from fl_lib.asr.pack import pack_model

    try:
        pack_model(args.exp_dir, args.model, args.inference_config, args.outpath,
                   lm_train_config=args.lm_train_config, lm_file=args.lm_file)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"pack_model: {e}") from None


if __name__ == "__main__":
    main()
