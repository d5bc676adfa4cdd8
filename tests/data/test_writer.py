"""ShardWriter: numbered shards read back as written, deterministic bytes."""
import os

import pytest

from fastclip.data.source import ShardSource
from fastclip.data.writer import ShardWriter

from ._build import jpeg


def test_writer_round_trip(tmp_path):
    with ShardWriter(str(tmp_path / "w-%03d.tar"), max_samples=3) as w:
        for i in range(7):
            w.write(f"{i:04d}", {"jpg": jpeg(i), "txt": f"t{i}"})
    assert sorted(os.listdir(tmp_path)) == ["w-000.tar", "w-001.tar", "w-002.tar"]
    got = list(ShardSource(str(tmp_path / "w-{000..002}.tar")).iter(0, 0, 1))
    assert [s.caption for s in got] == [f"t{i}" for i in range(7)]
    assert got[4].image == jpeg(4)


def test_writer_bytes_depend_on_the_samples_only(tmp_path):
    def write(d):
        with ShardWriter(str(tmp_path / d / "s-%02d.tar"), max_samples=2) as w:
            for i in range(3):
                w.write(f"k{i}", {"jpg": jpeg(i), "txt": f"caption {i}", "json": "{}"})
        return w
    a, b = write("a"), write("b")
    assert a.paths == [str(tmp_path / "a" / "s-00.tar"), str(tmp_path / "a" / "s-01.tar")] and a.total == 3
    for pa, pb in zip(a.paths, b.paths):
        with open(pa, "rb") as fa, open(pb, "rb") as fb:
            assert fa.read() == fb.read()
    with pytest.raises(ValueError, match="max_samples must be >= 1, got 0"):
        ShardWriter(str(tmp_path / "c-%d.tar"), max_samples=0)
