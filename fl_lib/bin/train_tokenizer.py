"""Stage 4 CLI: sentencepiece model and ESPnet token list from the clients' transcripts."""
from __future__ import annotations

import argparse
from pathlib import Path

from fl_lib.data.tokenizer import TOKEN_TYPES, train_tokenizer_from_clients
from fl_lib.log import setup_logging


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train bpe.model (sentencepiece) and write tokens.txt "
        "(<blank>, <unk>, pieces, <sos/eos>) as ESPnet's asr.sh does.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--clients", type=Path, required=True, help="clients.jsonl of stage 2")
    parser.add_argument(
        "--token_type", choices=TOKEN_TYPES, default="char", help="sentencepiece model type"
    )
    parser.add_argument(
        "--vocab_size", type=int, default=0, help="needed for bpe/unigram; ignored for char"
    )
    parser.add_argument(
        "--output_dir", type=Path, required=True, help="gets bpe.model and tokens.txt"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    setup_logging()
    train_tokenizer_from_clients(args.clients, args.output_dir, args.token_type, args.vocab_size)


if __name__ == "__main__":
    main()
