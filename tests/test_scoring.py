"""WER/CER counts on hand-aligned pairs, and ESPnet's trn and table formats."""
from __future__ import annotations

import pytest

from fl_lib.asr.scoring import ErrorStats, format_table, score, score_by_speaker, write_trn


def test_substitution_deletion_insertion():
    # ref: A B C D / hyp: A X C  -> 2 corr, 1 sub (B->X), 1 del (D)
    # ref: E F     / hyp: E F G  -> 2 corr, 1 ins (G)
    # ref: H I     / hyp: H I    -> exact
    s = score(["A B C D", "E F", "H I"], ["A X C", "E F G", "H I"])
    assert (s.snt, s.wrd, s.corr, s.sub, s.dele, s.ins, s.snt_err) == (3, 8, 6, 1, 1, 1, 2)
    p = s.percentages()
    assert p == {"Corr": 75.0, "Sub": 12.5, "Del": 12.5, "Ins": 12.5, "Err": 37.5, "S.Err": 66.67}


def test_empty_hypothesis_is_all_deletions():
    s = score(["TURN ON THE LIGHTS"], [""])
    assert (s.wrd, s.corr, s.dele, s.ins, s.snt_err) == (4, 0, 4, 0, 1)
    assert s.percentages()["Err"] == 100.0


def test_empty_reference_counts_insertions():
    s = score(["", "", "A B"], ["X Y", "", "A B"])
    assert (s.snt, s.wrd, s.corr, s.ins, s.snt_err) == (3, 2, 2, 2, 1)
    assert s.percentages()["Err"] == 100.0
    only_empty = score([""], [""])
    assert only_empty.wrd == 0 and only_empty.percentages()["Err"] is None
    assert "n/a" in only_empty.row("x")
    assert score([], []) == ErrorStats()


def test_cer_counts_spaces_and_ignores_extra_whitespace():
    # ref "AB CD" = 5 chars (space included, as ESPnet's <space> token); hyp "AB  CE " -> one sub
    s = score(["AB CD"], ["AB  CE "], unit="char")
    assert (s.wrd, s.corr, s.sub, s.dele, s.ins) == (5, 4, 1, 0, 0)
    assert score(["AB"], ["ABC"], unit="char").ins == 1


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 references but 1"):
        score(["A", "B"], ["A"])


def test_per_speaker_and_table():
    per = score_by_speaker(["A B", "C D", "E"], ["A B", "C", "F"], ["s1", "s2", "s2"])
    assert list(per) == ["s1", "s2"]
    assert (per["s2"].wrd, per["s2"].dele, per["s2"].sub) == (3, 1, 1)
    table = format_table(per, "speaker").splitlines()
    assert table[0] == "|speaker|Snt|Wrd|Corr|Sub|Del|Ins|Err|S.Err|"
    assert table[1] == "|---|---|---|---|---|---|---|---|---|"
    assert table[2] == "|s1|1|2|100.0|0.0|0.0|0.0|0.0|0.0|"
    assert table[3] == "|s2|2|3|33.3|33.3|33.3|0.0|66.7|100.0|"


def test_stats_round_trip():
    s = score(["A B C"], ["A C D"])
    assert ErrorStats.from_dict(s.to_dict()) == s


def test_trn_format(tmp_path):
    path = tmp_path / "hyp.trn"
    write_trn(path, ["TURN  ON ", ""], ["1089-134686-0000", "1089-134686-0001"], ["1089", "1089"])
    assert path.read_text() == "TURN ON\t(1089-1089-134686-0000)\n\t(1089-1089-134686-0001)\n"
