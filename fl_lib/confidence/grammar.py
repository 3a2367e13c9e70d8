"""The `k2_lm` confidence's grammar: a token n-gram of the LM text, in the seed model's tokens.

The LM text is tokenized exactly as the ASR model's transcripts were (ESPnet's
sentencepiece tokenizer with the seed's model, or ESPnet's char tokens with
<space> for a model without one, then its token list), so the n-gram's ids are
the CTC output ids the lattice scores.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from fl_lib.atomic import atomic_path
from fl_lib.confidence.ngram import TokenNgram
from fl_lib.data.markers import file_stamp

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrammarSpec:
    lm_text: Path  # one sentence per line (.txt or .txt.gz): the seed recipe's LM corpus
    token_list: Path  # the seed's tokens.txt: line i is CTC output i
    bpemodel: Optional[Path]  # the seed's sentencepiece model; None: ESPnet's char tokens
    order: int  # n-gram order
    lm_weight: float  # scale of the n-gram's log-probabilities in the lattice

    def __post_init__(self) -> None:
        if self.order < 1:
            raise ValueError(f"ngram_order must be >= 1, got {self.order}")
        if not self.lm_weight > 0:
            raise ValueError(f"lm_weight must be > 0 for k2_lm confidence, got {self.lm_weight}")
        for path in (self.lm_text, self.token_list, self.bpemodel):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"k2_lm confidence needs {path}, which does not exist")

    def stamp(self) -> dict:
        """What the grammar was built from: any change rebuilds it and recomputes the confidences."""
        return {**asdict(self), "lm_text": file_stamp(self.lm_text), "token_list": file_stamp(self.token_list),
                "bpemodel": file_stamp(self.bpemodel) if self.bpemodel else None}


def build_grammar(spec: GrammarSpec, output: Path) -> TokenNgram:
    """Tokenize spec.lm_text, estimate the n-gram and write it as a k2 acceptor to `output`."""
    from espnet2.text.build_tokenizer import build_tokenizer
    from espnet2.text.token_id_converter import TokenIDConverter

    from fl_lib.asr.lm import read_sentences

    tokens = Path(spec.token_list).read_text(encoding="utf-8").split()
    tokenizer = (build_tokenizer(token_type="bpe", bpemodel=str(spec.bpemodel)) if spec.bpemodel
                 else build_tokenizer(token_type="char", space_symbol="<space>"))
    converter = TokenIDConverter(token_list=tokens, unk_symbol="<unk>")
    unk = converter.token2id["<unk>"]
    sentences, num_tokens, num_unk = [], 0, 0
    for sentence in read_sentences(spec.lm_text):
        ids = converter.tokens2ids(tokenizer.text2tokens(sentence))
        sentences.append(ids)
        num_tokens += len(ids)
        num_unk += sum(i == unk for i in ids)
    if num_unk > 0.01 * num_tokens:
        raise ValueError(f"{spec.lm_text}: {num_unk} of {num_tokens} tokens are <unk> in {spec.token_list}: "
                         f"the LM text is not in the seed's alphabet (case, another language?)")
    # The last id is ESPnet's <sos/eos>: never a CTC hypothesis token, but an output of the CTC layer.
    lm = TokenNgram(sentences, spec.order, vocab_size=len(tokens))
    text = lm.to_k2_str()
    with atomic_path(Path(output)) as tmp:
        tmp.write_text(text, encoding="utf-8")
    logger.info("token %d-gram of %s: %d sentences, %d tokens (%d <unk>), %d histories, %d arcs -> %s",
                spec.order, spec.lm_text, len(sentences), num_tokens, num_unk, len(lm.counts),
                text.count("\n") - 1, output)
    return lm
