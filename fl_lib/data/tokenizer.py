"""Stage 4: a sentencepiece model and ESPnet's token list, plus the text <-> ids mapping.

ESPnet's `token_type: bpe` + `bpemodel` handles every sentencepiece model type
(char, bpe, unigram), so one code path serves all three. The token list follows
egs2/TEMPLATE/asr1/asr.sh: `<blank>` (CTC blank, id 0), `<unk>` (id 1), the
sentencepiece pieces without its own `<unk>`, `<s>`, `</s>`, and `<sos/eos>` last.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from fl_lib.data.markers import file_stamp, files_digest, is_done, mark_done

DONE_MARKER = ".train_tokenizer.done"
BLANK = "<blank>"
UNK = "<unk>"
SOS_EOS = "<sos/eos>"
TOKEN_TYPES = ("char", "bpe", "unigram")
# sentencepiece's own control/unknown pieces (ids 0-2) that asr.sh drops from the list.
_SPM_RESERVED = 3

logger = logging.getLogger(__name__)


def train_tokenizer(
    texts: Iterable[str],
    output_dir: Path,
    token_type: str = "char",
    vocab_size: int = 0,
) -> tuple[Path, Path]:
    """Train `output_dir/bpe.model` on `texts` and write `output_dir/tokens.txt`.

    `char` sizes its vocabulary from the data, so `vocab_size` is ignored there;
    `bpe` and `unigram` need `vocab_size > 0`. Training is deterministic
    (fixed seed, one thread, every sentence used).
    """
    if token_type not in TOKEN_TYPES:
        raise ValueError(f"token_type must be one of {TOKEN_TYPES}, got {token_type!r}")
    if token_type != "char" and vocab_size <= 0:
        raise ValueError(f"token_type={token_type!r} needs vocab_size > 0, got {vocab_size}")
    stripped = [t.strip() for t in texts]
    sentences = [t for t in stripped if t]
    if not sentences:
        raise ValueError("no non-empty transcripts to train the tokenizer on")
    empty = len(stripped) - len(sentences)
    if empty:
        logger.warning("%d of %d transcripts are empty: the tokenizer is trained without them", empty, len(stripped))

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    prefix = output_dir / "bpe"
    options = dict(
        sentence_iterator=iter(sentences),
        model_prefix=str(prefix),
        model_type=token_type,
        character_coverage=1.0,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    if token_type == "char":
        # sentencepiece asks a char model for its size too: every distinct character
        # (space becomes the piece "▁") plus its 3 reserved pieces; the soft limit
        # absorbs what text normalization merges.
        options["hard_vocab_limit"] = False
        options["vocab_size"] = len(set("".join(sentences))) + _SPM_RESERVED
    else:
        options["vocab_size"] = vocab_size
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(**options)

    bpemodel = prefix.with_suffix(".model")
    processor = spm.SentencePieceProcessor(model_file=str(bpemodel))
    pieces = [processor.id_to_piece(i) for i in range(_SPM_RESERVED, processor.get_piece_size())]
    token_list = output_dir / "tokens.txt"
    token_list.write_text("\n".join([BLANK, UNK, *pieces, SOS_EOS]) + "\n", encoding="utf-8")
    logger.info(
        "%s tokenizer from %d sentences (%d empty ones skipped): %d tokens -> %s",
        token_type, len(sentences), empty, len(pieces) + 3, token_list,
    )
    return bpemodel, token_list


def client_transcripts(clients_jsonl: Path) -> Iterator[str]:
    """Yield every supervision text of every client's manifest, client by client."""
    from lhotse import load_manifest_lazy

    from fl_lib.data.clients import load_clients

    for client in load_clients(clients_jsonl):
        for cut in load_manifest_lazy(client.manifest):
            for sup in cut.supervisions:
                yield sup.text


def train_tokenizer_from_clients(
    clients_jsonl: Path,
    output_dir: Path,
    token_type: str = "char",
    vocab_size: int = 0,
) -> tuple[Path, Path]:
    """Stage 4 of the recipe: train the tokenizer on all training clients' transcripts.

    The transcripts are the only client data the server sees in this stage, as
    in the federated ASR literature, where the output vocabulary is fixed beforehand.
    ``output_dir/.train_tokenizer.done`` stamps the clients and settings: a re-run
    with both unchanged returns at once, any change retrains.
    """
    from fl_lib.data.clients import load_clients

    clients_jsonl, output_dir = Path(clients_jsonl), Path(output_dir)
    outputs = (output_dir / "bpe.model", output_dir / "tokens.txt")
    done = output_dir / DONE_MARKER
    stamp = {
        "clients": file_stamp(clients_jsonl),
        "manifests": files_digest(c.manifest for c in load_clients(clients_jsonl)),
        "token_type": token_type,
        "vocab_size": vocab_size,
    }
    if is_done(done, stamp, outputs):
        logger.info("Tokenizer of %s already in %s (%s exists): skipping", clients_jsonl, output_dir, done)
        return outputs
    done.unlink(missing_ok=True)
    result = train_tokenizer(client_transcripts(clients_jsonl), output_dir, token_type, vocab_size)
    mark_done(done, stamp)
    return result


class Tokenizer:
    """Text <-> token ids exactly as ESPnet's training preprocessor and Speech2Text do."""

    def __init__(self, bpemodel: Path, token_list: Path) -> None:
        from espnet2.text.sentencepiece_tokenizer import SentencepiecesTokenizer
        from espnet2.text.token_id_converter import TokenIDConverter

        self.bpemodel = Path(bpemodel)
        self.token_list = Path(token_list)
        self._tokenizer = SentencepiecesTokenizer(self.bpemodel)
        self._converter = TokenIDConverter(self.token_list, unk_symbol=UNK)
        tokens = self._converter.token_list
        if tokens[0] != BLANK or tokens[-1] != SOS_EOS:
            raise ValueError(f"{token_list}: expected {BLANK} first and {SOS_EOS} last")
        self.blank_id = 0
        self.unk_id = self._converter.unk_id
        self.sos_eos_id = len(tokens) - 1

    def __len__(self) -> int:
        return len(self._converter.token_list)

    @property
    def tokens(self) -> list[str]:
        return list(self._converter.token_list)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (unknown pieces map to `<unk>`)."""
        return self._converter.tokens2ids(self._tokenizer.text2tokens(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; skips `<blank>`, `<sos/eos>` and negative ids (ESPnet's -1 padding)."""
        skip = {self.blank_id, self.sos_eos_id}
        kept = [int(i) for i in ids if int(i) >= 0 and int(i) not in skip]
        return self._tokenizer.tokens2text(self._converter.ids2tokens(kept))
