"""Stage 2: the speaker split and the dev/test length filter."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
from lhotse import CutSet, MonoCut, Recording, SupervisionSegment, load_manifest_lazy
from lhotse.audio import AudioSource

from fl_lib.data.clients import ClientInfo, filter_cuts, load_clients, split_clients


def make_cut(utt_id: str, speaker: str | None, duration: float, with_supervision: bool = True) -> MonoCut:
    num_samples = int(duration * 16000)
    recording = Recording(
        id=utt_id,
        sources=[AudioSource(type="file", channels=[0], source=f"/nonexistent/{utt_id}.flac")],
        sampling_rate=16000,
        num_samples=num_samples,
        duration=num_samples / 16000,
    )
    sups = [
        SupervisionSegment(id=utt_id, recording_id=utt_id, start=0.0, duration=recording.duration, speaker=speaker, text="HI")
    ] if with_supervision else []
    return MonoCut(id=f"{utt_id}-0", start=0.0, duration=recording.duration, channel=0, supervisions=sups, recording=recording)


@pytest.fixture
def cuts_manifest(tmp_path) -> Path:
    """Interleaved speakers: A has 4 cuts (one too short, one too long), B 3, C 1; plus two unusable cuts."""
    cuts = [
        make_cut("A-1-0000", "A", 2.0),
        make_cut("B-1-0000", "B", 3.0),
        make_cut("A-1-0001", "A", 0.2),
        make_cut("C-1-0000", "C", 1.5),
        make_cut("B-1-0001", "B", 1.0),
        make_cut("A-1-0002", "A", 30.0),
        make_cut("X-1-0000", None, 2.0),
        make_cut("Y-1-0000", "Y", 2.0, with_supervision=False),
        make_cut("B-1-0002", "B", 4.0),
        make_cut("A-1-0003", "A", 5.0),
    ]
    path = tmp_path / "cuts.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(path)
    return path


def gzip_members(path: Path) -> int:
    data, members = path.read_bytes(), 0
    while data:
        d = zlib.decompressobj(31)
        d.decompress(data)
        data, members = d.unused_data, members + 1
    return members


def test_one_speaker_per_client_and_counts(cuts_manifest, tmp_path):
    clients_path = split_clients(cuts_manifest, tmp_path / "clients", min_utts=2, min_duration=0.5, max_duration=20.0)
    clients = load_clients(clients_path)
    assert [c.id for c in clients] == ["A", "B"]
    for client in clients:
        cuts = list(load_manifest_lazy(client.manifest))
        assert {c.supervisions[0].speaker for c in cuts} == {client.id}
        assert client.num_cuts == len(cuts)
        assert client.duration == pytest.approx(sum(c.duration for c in cuts), abs=1e-3)
    assert {(c.id, c.num_cuts, c.duration) for c in clients} == {("A", 2, 7.0), ("B", 3, 8.0)}
    assert not (tmp_path / "clients/cuts/C.jsonl.gz").exists()  # dropped by min_utts


def test_split_is_lossless(cuts_manifest, tmp_path):
    """The union of the client manifests is exactly the filtered input, cut for cut."""
    clients = load_clients(split_clients(cuts_manifest, tmp_path / "clients", min_duration=0.5, max_duration=20.0))
    original = {c.id: c.to_dict() for c in load_manifest_lazy(cuts_manifest)}
    want = sorted(
        cid for cid, d in original.items()
        if d["supervisions"] and d["supervisions"][0].get("speaker") and 0.5 <= d["duration"] <= 20.0
    )
    got = [cut for client in clients for cut in load_manifest_lazy(client.manifest)]
    assert sorted(c.id for c in got) == want
    assert len(want) == 6
    assert all(cut.to_dict() == original[cut.id] for cut in got)


def test_split_logs_what_it_drops(cuts_manifest, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    split_clients(cuts_manifest, tmp_path / "clients", min_utts=2, min_duration=0.5, max_duration=20.0)
    text = caplog.text
    assert "kept 6 cuts" in text
    assert "'no supervision or speaker': 2" in text
    assert "'shorter than 0.5 s': 1" in text
    assert "'longer than 20.0 s': 1" in text
    assert "Dropped 1 clients with fewer than 2 utterances (1 cuts): ['C']" in text


def test_cut_of_several_speakers_is_dropped_and_counted(tmp_path, caplog):
    """No one client owns a cut that two speakers share; one speaker in several supervisions is fine."""
    shared, repeated = make_cut("A-1-0000", "A", 2.0), make_cut("B-1-0000", "B", 2.0)
    for cut in (shared, repeated):
        cut.supervisions.append(replace(cut.supervisions[0], id=f"{cut.id}-b", start=1.0, duration=1.0, speaker="B"))
    path = tmp_path / "cuts.jsonl.gz"
    CutSet.from_cuts([shared, repeated, make_cut("A-1-0001", "A", 1.0)]).to_file(path)
    caplog.set_level(logging.INFO)
    clients = load_clients(split_clients(path, tmp_path / "clients"))
    assert [(c.id, c.num_cuts) for c in clients] == [("A", 1), ("B", 1)]
    assert [c.id for c in load_manifest_lazy(clients[0].manifest)] == ["A-1-0001-0"]
    assert "kept 2 cuts, dropped {'several speakers': 1}" in caplog.text


def test_filter_cuts_rerun_skips_and_changes_redo(cuts_manifest, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "dev.jsonl.gz"
    filter_cuts(cuts_manifest, out, min_duration=0.5)
    mtime = out.stat().st_mtime_ns
    filter_cuts(cuts_manifest, out, min_duration=0.5)
    assert "already filtered" in caplog.text and out.stat().st_mtime_ns == mtime
    assert len(list(load_manifest_lazy(filter_cuts(cuts_manifest, out, min_duration=2.0)))) == 6
    CutSet.from_cuts([make_cut("D-1-0000", "D", 3.0)]).to_file(cuts_manifest)  # a re-run of stage 1
    assert [c.id for c in load_manifest_lazy(filter_cuts(cuts_manifest, out, min_duration=2.0))] == ["D-1-0000-0"]


def test_filter_cuts_logs_and_loads(cuts_manifest, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = filter_cuts(cuts_manifest, tmp_path / "sets/dev.jsonl.gz", min_duration=0.5, max_duration=20.0)
    assert len(list(load_manifest_lazy(out))) == 7  # the cut with no speaker still has a supervision
    assert "'no supervision': 1" in caplog.text
    assert "'shorter than 0.5 s': 1" in caplog.text and "'longer than 20.0 s': 1" in caplog.text


def test_lru_eviction_writes_multi_member_gzip_that_lhotse_reads(cuts_manifest, tmp_path):
    clients = load_clients(split_clients(cuts_manifest, tmp_path / "clients", lru_size=1))
    a = next(c for c in clients if c.id == "A")
    assert gzip_members(a.manifest) == 4  # A's cuts are never adjacent in the input
    assert [c.id for c in load_manifest_lazy(a.manifest)] == ["A-1-0000-0", "A-1-0001-0", "A-1-0002-0", "A-1-0003-0"]


def test_byte_budget_bounds_pending_lines(cuts_manifest, tmp_path):
    clients = load_clients(split_clients(cuts_manifest, tmp_path / "clients", max_pending_bytes=1))
    assert sum(c.num_cuts for c in clients) == 8
    assert all(gzip_members(c.manifest) == c.num_cuts for c in clients)


def test_rerun_skips_and_parameter_change_redoes(cuts_manifest, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "clients"
    first = split_clients(cuts_manifest, out, lru_size=1)
    split_clients(cuts_manifest, out, lru_size=1)
    assert "already in" in caplog.text
    assert load_clients(first) == load_clients(split_clients(cuts_manifest, out, lru_size=1))
    clients = load_clients(split_clients(cuts_manifest, out, min_utts=3))  # redone from empty files, no duplicates
    assert {(c.id, c.num_cuts) for c in clients} == {("A", 4), ("B", 3)}


def test_load_clients_resolves_relative_paths(cuts_manifest, tmp_path):
    clients_path = split_clients(cuts_manifest, tmp_path / "clients")
    first = json.loads(clients_path.read_text().splitlines()[0])
    assert not Path(first["manifest"]).is_absolute()
    client = load_clients(clients_path)[0]
    assert isinstance(client, ClientInfo) and client.manifest == tmp_path / "clients" / first["manifest"]
    assert client.manifest.is_file()


def test_speaker_ids_that_are_not_file_names(tmp_path):
    path = tmp_path / "cuts.jsonl.gz"
    CutSet.from_cuts([make_cut("u1", "a/b", 1.0), make_cut("u2", "a_b", 1.0), make_cut("u3", "../x", 1.0)]).to_file(path)
    clients = load_clients(split_clients(path, tmp_path / "clients"))
    assert sorted(c.id for c in clients) == ["../x", "a/b", "a_b"]
    for client in clients:
        assert client.manifest.parent == tmp_path / "clients/cuts"
        assert [c.supervisions[0].speaker for c in load_manifest_lazy(client.manifest)] == [client.id]


def test_cli(cuts_manifest, tmp_path):
    out = tmp_path / "clients"
    cmd = [sys.executable, "-m", "fl_lib.bin.split_clients", "--cuts", str(cuts_manifest), "--output_dir", str(out),
           "--min_utts", "2", "--min_duration", "0.5", "--max_duration", "20"]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "(clients:" in run.stderr and "WARNING" in run.stderr
    assert [c.id for c in load_clients(out / "clients.jsonl")] == ["A", "B"]
    dev = tmp_path / "dev.jsonl.gz"
    subprocess.run([sys.executable, "-m", "fl_lib.bin.filter_cuts", "--cuts", str(cuts_manifest), "--output", str(dev),
                    "--min_duration", "0.5"], check=True, capture_output=True)
    assert len(list(load_manifest_lazy(dev))) == 8


def test_tiny_clients_fixture_one_speaker_each(request):
    """The session fixture chain (stage 0 -> 1 -> 2) on the synthesized corpus."""
    clients = load_clients(request.getfixturevalue("tiny_clients"))
    assert len(clients) >= 2
    for client in clients:
        assert {c.supervisions[0].speaker for c in load_manifest_lazy(client.manifest)} == {client.id}
    for path in request.getfixturevalue("tiny_sets").values():
        assert path.is_file()


def test_several_parts_make_one_federation(cuts_manifest, tmp_path):
    """LibriSpeech 960 h: three training parts, one clients.jsonl; the CLI takes the parts as one --cuts list."""
    other = tmp_path / "other.jsonl.gz"
    CutSet.from_cuts([make_cut("D-2-0000", "D", 2.0), make_cut("B-2-0000", "B", 1.0), make_cut("D-2-0001", "D", 3.0)]).to_file(other)
    out = tmp_path / "clients"
    subprocess.run([sys.executable, "-m", "fl_lib.bin.split_clients", "--cuts", str(cuts_manifest), str(other),
                    "--output_dir", str(out), "--min_utts", "2", "--min_duration", "0.5", "--max_duration", "20"],
                   check=True, capture_output=True)
    clients = {c.id: c for c in load_clients(out / "clients.jsonl")}
    assert {k: (c.num_cuts, c.duration) for k, c in clients.items()} == {"A": (2, 7.0), "B": (4, 9.0), "D": (2, 5.0)}
    assert [c.id for c in load_manifest_lazy(clients["B"].manifest)] == ["B-1-0000-0", "B-1-0001-0", "B-1-0002-0", "B-2-0000-0"]
    CutSet.from_cuts([make_cut("D-2-0000", "D", 2.0)]).to_file(other)  # a changed part redoes the split
    split_clients([cuts_manifest, other], out, min_utts=2, min_duration=0.5, max_duration=20.0)
    assert "D" not in {c.id for c in load_clients(out / "clients.jsonl")}
