"""Sample assembly: keys, captions and labels, uids, and samples at the damage of a tar."""
import json

from fastclip.data.samples import iter_shard
from fastclip.data.stats import DataStats

from ._build import good_sample, jpeg, png, write_tar


def test_key_is_up_to_the_first_dot_and_json_captions(tmp_path):
    path = tmp_path / "s.tar"
    meta = json.dumps({"caption": " from json ", "label": 3})
    write_tar(path, [("a/b.c/x1", {"seg.jpg": jpeg(0), "json": meta}),
                     ("x2", {"png": png(), "json": json.dumps({"text": "t"}), "cls": "5"})])
    samples = [s for s, _, _ in iter_shard(str(path))]
    assert samples[0] is None  # "x1.seg.jpg" has extension "seg.jpg": not an image member
    path2 = tmp_path / "t.tar"
    write_tar(path2, [("x1", {"jpg": jpeg(0), "json": json.dumps({"caption": " from json ", "label": 3})}),
                      ("x2", {"png": png(), "json": json.dumps({"text": "t"}), "cls": "5"})])
    s1, s2 = [s for s, _, _ in iter_shard(str(path2))]
    assert (s1.caption, s1.label, s1.image_ext) == ("from json", 3, "jpg")
    assert (s2.caption, s2.label, s2.image_ext) == ("t", 5, "png")


def _member_offsets(path) -> dict:
    import tarfile
    with tarfile.open(path) as t:
        return {m.name: (m.offset, m.offset_data) for m in t.getmembers()}


def test_uids_count_bad_samples_and_damage_loses_only_the_sample_it_cuts(tmp_path):
    path = tmp_path / "whole.tar"
    write_tar(path, [good_sample(0), ("nocap", {"jpg": jpeg(1)}), good_sample(2), good_sample(3)])
    got = list(iter_shard(str(path), shard_index=4))
    assert [(s.uid if s else None, why) for s, why, _ in got] == [
        ((4, 0), None), (None, "missing_caption"), ((4, 2), None), ((4, 3), None)]
    data, offsets = path.read_bytes(), _member_offsets(path)
    # Cut inside 000003.jpg: 000002 is whole, 000003 lost a member.
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:offsets["000003.jpg"][1] + 20])
    stats = DataStats(warn=False)
    got = list(iter_shard(str(cut), 4, stats))
    assert [(s.key if s else None, why) for s, why, _ in got][-2:] == [("000002", None),
                                                                         (None, "truncated_sample")]
    assert dict(stats.skipped) == {"truncated_tar": 1}
    # Cut at the boundary before 000003's first member (inside its header): 000002 is whole, nothing lost.
    cut.write_bytes(data[:offsets["000003.jpg"][0] + 100])
    stats = DataStats(warn=False)
    got = list(iter_shard(str(cut), 4, stats))
    assert [(s.key if s else None, why) for s, why, _ in got][-1] == ("000002", None)
    assert dict(stats.skipped) == {"truncated_tar": 1}
    # Missing and unreadable shards are counted, nothing is yielded.
    stats = DataStats(warn=False)
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    assert list(iter_shard(str(tmp_path / "absent.tar"), 0, stats)) == []
    assert list(iter_shard(str(tmp_path / "junk.tar"), 0, stats)) == []
    assert dict(stats.skipped) == {"missing_shard": 1, "unreadable_shard": 1}
