"""Stage 4: sentencepiece + ESPnet token list, and ids that match ESPnet's own pipeline."""
from __future__ import annotations

import logging

import sentencepiece as spm
import pytest
from lhotse import load_manifest_lazy

from fl_lib.bin.train_tokenizer import main as train_tokenizer_cli
from fl_lib.data.clients import load_clients
from fl_lib.data.tokenizer import (
    Tokenizer,
    client_transcripts,
    train_tokenizer,
    train_tokenizer_from_clients,
)


@pytest.fixture(scope="module")
def transcripts(tiny_clients) -> list[str]:
    return list(client_transcripts(tiny_clients))


def test_token_list_layout(tiny_tokens):
    bpemodel, token_list = tiny_tokens
    tokens = token_list.read_text(encoding="utf-8").splitlines()
    sp = spm.SentencePieceProcessor(model_file=str(bpemodel))
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert tokens[:2] == ["<blank>", "<unk>"]
    assert tokens[-1] == "<sos/eos>"
    assert tokens[2:-1] == [sp.id_to_piece(i) for i in range(3, sp.get_piece_size())]
    assert len(set(tokens)) == len(tokens)
    assert "\u2581" in tokens  # the word boundary piece of a char model


def test_round_trip(tiny_tokens, transcripts):
    tok = Tokenizer(*tiny_tokens)
    assert transcripts
    for text in transcripts:
        ids = tok.encode(text)
        assert ids and tok.unk_id not in ids and tok.blank_id not in ids
        assert tok.decode(ids) == text
    # ESPnet's padding (-1), blank and <sos/eos> are dropped when decoding
    ids = tok.encode(transcripts[0])
    assert tok.decode([tok.sos_eos_id, 0, *ids, tok.sos_eos_id, -1, -1]) == transcripts[0]


def test_ids_match_espnet_preprocessor(tiny_tokens, transcripts):
    """ESPnet's training preprocessor gives the same ids as Tokenizer.encode."""
    from fl_lib.espnet_env import quiet_nltk

    quiet_nltk()
    from espnet2.train.preprocessor import CommonPreprocessor

    bpemodel, token_list = tiny_tokens
    pre = CommonPreprocessor(train=False, token_type="bpe", token_list=token_list, bpemodel=bpemodel)
    tok = Tokenizer(bpemodel, token_list)
    for i, text in enumerate(transcripts):
        espnet_ids = pre(f"utt{i}", {"text": text})["text"].tolist()
        assert espnet_ids == tok.encode(text)


def test_manifest_transcripts_are_read(tiny_clients, transcripts):
    clients = load_clients(tiny_clients)
    expected = sum(
        len(cut.supervisions) for c in clients for cut in load_manifest_lazy(c.manifest)
    )
    assert len(transcripts) == expected


@pytest.mark.parametrize("token_type", ["bpe", "unigram"])
def test_subword_models(token_type, transcripts, tmp_path):
    vocab_size = len(set("".join(transcripts))) + 10
    bpemodel, token_list = train_tokenizer(transcripts, tmp_path, token_type, vocab_size)
    tok = Tokenizer(bpemodel, token_list)
    assert len(tok) == vocab_size  # sentencepiece's <s>, </s> out; <blank>, <sos/eos> in
    for text in transcripts:
        assert tok.decode(tok.encode(text)) == text


def _pieces(bpemodel) -> list[tuple[str, float]]:
    sp = spm.SentencePieceProcessor(model_file=str(bpemodel))
    return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]


@pytest.mark.parametrize("token_type", ["bpe", "unigram"])
def test_deterministic(token_type, transcripts, tmp_path):
    (model_a, list_a), (model_b, list_b) = (
        train_tokenizer(transcripts, tmp_path / d, token_type, 30) for d in "ab"
    )
    assert list_a.read_text() == list_b.read_text()
    assert _pieces(model_a) == _pieces(model_b)


def test_errors(transcripts, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(transcripts, tmp_path, "bpe", 0)
    with pytest.raises(ValueError, match="token_type"):
        train_tokenizer(transcripts, tmp_path, "word", 0)
    with pytest.raises(ValueError, match="no non-empty"):
        train_tokenizer(["", "  "], tmp_path, "char")


def test_cli(tiny_clients, tiny_tokens, tmp_path):
    train_tokenizer_cli(["--clients", str(tiny_clients), "--output_dir", str(tmp_path)])
    assert (tmp_path / "tokens.txt").read_text() == tiny_tokens[1].read_text()
    assert train_tokenizer_from_clients(tiny_clients, tmp_path)[1] == tmp_path / "tokens.txt"


def test_rerun_skips_and_changed_clients_retrain(tiny_clients, tiny_tokens, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    clients = tmp_path / "clients.jsonl"
    clients.write_text(tiny_clients.read_text())  # relative manifest paths: point them at the originals
    (tmp_path / "cuts").symlink_to(tiny_clients.parent / "cuts")
    bpemodel, token_list = train_tokenizer_from_clients(clients, tmp_path / "tokens")
    assert token_list.read_text() == tiny_tokens[1].read_text()
    mtime = bpemodel.stat().st_mtime_ns
    assert train_tokenizer_from_clients(clients, tmp_path / "tokens") == (bpemodel, token_list)
    assert "already in" in caplog.text and bpemodel.stat().st_mtime_ns == mtime

    first = load_clients(clients)[0]
    clients.write_text(clients.read_text().splitlines()[0] + "\n")  # a re-run of stage 2 kept one client
    train_tokenizer_from_clients(clients, tmp_path / "tokens")
    expected = train_tokenizer(client_transcripts(clients), tmp_path / "expected")[1].read_text()
    assert token_list.read_text() == expected != tiny_tokens[1].read_text()
    assert [c.id for c in load_clients(clients)] == [first.id]
    assert train_tokenizer_from_clients(clients, tmp_path / "tokens", "bpe", 40)[1].read_text().count("\n") == 40


def test_empty_transcripts_are_counted_and_reported(transcripts, tmp_path, caplog):
    """Dropping empty transcripts silently hides a data problem (a bad stage 2 filter, a broken corpus)."""
    import logging

    caplog.set_level(logging.INFO, logger="fl_lib.data.tokenizer")
    train_tokenizer([*transcripts, "", "   "], tmp_path, "char")
    n = len(transcripts) + 2
    assert f"2 of {n} transcripts are empty: the tokenizer is trained without them" in caplog.text
    assert f"from {len(transcripts)} sentences (2 empty ones skipped)" in caplog.text
