"""Corrupted clients: same audio, same words, wrong pairing."""
from collections import Counter

from lhotse import load_manifest_lazy

from fl_lib.data.clients import load_clients
from fl_lib.data.corrupt import corrupt_clients


def test_corrupt_two_clients_shuffles_their_words_only(tiny_clients, tmp_path):
    listing = corrupt_clients(tiny_clients, tmp_path, num_corrupted=2, seed=3)
    bad = set((tmp_path / "corrupted.txt").read_text().split())
    assert len(bad) == 2
    before = {c.id: c for c in load_clients(tiny_clients)}
    after = {c.id: c for c in load_clients(listing)}
    assert before.keys() == after.keys()
    for cid, c in after.items():
        old = list(load_manifest_lazy(before[cid].manifest))
        new = list(load_manifest_lazy(c.manifest))
        assert [x.id for x in old] == [x.id for x in new]
        assert [x.recording.sources[0].source for x in old] == [x.recording.sources[0].source for x in new]
        old_text = [x.supervisions[0].text for x in old]
        new_text = [x.supervisions[0].text for x in new]
        if cid in bad:
            assert new_text != old_text
            assert Counter(" ".join(old_text).split()) == Counter(" ".join(new_text).split())
            assert [len(t.split()) for t in old_text] == [len(t.split()) for t in new_text]
        else:
            assert new_text == old_text


def test_client_ids_that_are_not_file_names_stay_in_the_output_dir(tiny_clients, tmp_path):
    """An id like `../x` must not write outside output_dir/cuts: the stage-2 safe name is used."""
    import json

    from fl_lib.data.clients import safe_file_name

    first = load_clients(tiny_clients)[0]
    listing = tmp_path / "clients.jsonl"
    row = {"num_cuts": first.num_cuts, "duration": first.duration, "manifest": str(first.manifest)}
    listing.write_text("".join(json.dumps({"id": i, **row}) + "\n" for i in ("../escaped", "a/b")))
    out = tmp_path / "out"
    corrupted = load_clients(corrupt_clients(listing, out, num_corrupted=2, seed=0))
    assert not (out / "escaped.jsonl.gz").exists()
    assert sorted(c.manifest.name for c in corrupted) == sorted(f"{safe_file_name(i)}.jsonl.gz" for i in ("../escaped", "a/b"))
    assert all(c.manifest.parent == (out / "cuts").resolve() for c in corrupted)


def test_random_transcripts_keep_lengths_and_draw_from_the_federation_s_vocabulary(tiny_clients, tmp_path):
    import pytest

    listing = corrupt_clients(tiny_clients, tmp_path, num_corrupted=1, seed=3, mode="random")
    bad = (tmp_path / "corrupted.txt").read_text().split()
    before = {c.id: c for c in load_clients(tiny_clients)}
    vocabulary = {w for c in before.values() for x in load_manifest_lazy(c.manifest) for w in x.supervisions[0].text.split()}
    after = {c.id: c for c in load_clients(listing)}
    old = [x.supervisions[0].text.split() for x in load_manifest_lazy(before[bad[0]].manifest)]
    new = [x.supervisions[0].text.split() for x in load_manifest_lazy(after[bad[0]].manifest)]
    assert [len(t) for t in old] == [len(t) for t in new] and new != old
    assert set(w for t in new for w in t) <= vocabulary
    # not a permutation of its own words: some come from other clients' transcripts
    assert Counter(w for t in new for w in t) != Counter(w for t in old for w in t)
    with pytest.raises(ValueError, match="mode must be one of"):
        corrupt_clients(tiny_clients, tmp_path / "x", num_corrupted=1, seed=3, mode="flip")
