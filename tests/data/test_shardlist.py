"""expand_shards: brace patterns, ``::`` lists, directories, lists."""
import pytest

from fastclip.data.shardlist import expand_shards


def test_expand_braces_ranges_lists_and_directories(tmp_path):
    assert expand_shards("data/{00000..00003}.tar") == [f"data/0000{i}.tar" for i in range(4)]
    assert expand_shards("d/{8..11}.tar") == ["d/8.tar", "d/9.tar", "d/10.tar", "d/11.tar"]
    assert expand_shards("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert expand_shards("x.tar::y/{1..2}.tar") == ["x.tar", "y/1.tar", "y/2.tar"]
    assert expand_shards(["p.tar", "q.tar"]) == ["p.tar", "q.tar"]
    for name in ("b.tar", "a.tar", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert expand_shards(tmp_path) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    with pytest.raises(ValueError, match="at least one shard"):
        expand_shards([])


def test_several_braces_descending_ranges_and_missing_files_kept(tmp_path):
    first_slowest = ["a-0-x.tar", "a-0-y.tar", "a-1-x.tar"]
    assert expand_shards("{a,b}-{0..1}-{x,y}.tar")[:3] == first_slowest
    assert expand_shards("s-{3..1}.tar") == ["s-3.tar", "s-2.tar", "s-1.tar"]
    assert expand_shards("s-{09..11}.tar") == ["s-09.tar", "s-10.tar", "s-11.tar"]  # zero-padded width kept
    missing = str(tmp_path / "nope-{0..1}.tar")
    assert expand_shards(missing) == [str(tmp_path / "nope-0.tar"), str(tmp_path / "nope-1.tar")]
    with pytest.raises(ValueError, match="at least one shard"):
        expand_shards("::")
