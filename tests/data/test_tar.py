"""read_tar: long names, pax records, and damage (every complete member, then TarTruncated)."""
import io
import tarfile

import pytest

from fastclip.data.samples import iter_shard
from fastclip.data.tar import TarTruncated, read_tar

from ._build import good_sample, jpeg, write_tar


def test_reader_handles_long_names_and_pax(tmp_path):
    long_key = "dir/" + "k" * 150
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = tmp_path / f"long-{fmt}.tar"
        write_tar(path, [(long_key, {"jpg": jpeg(0), "txt": "long"}), good_sample(1)], fmt=fmt)
        with open(path, "rb") as f:
            names = [n for n, _ in read_tar(f)]
        assert names == [f"{long_key}.jpg", f"{long_key}.txt", "000001.jpg", "000001.txt"]
        got = [s for s, why, _ in iter_shard(str(path))]
        assert [s.key for s in got] == [long_key, "000001"] and got[0].caption == "long"


def _tar_bytes(tmp_path, samples) -> bytes:
    path = tmp_path / "whole.tar"
    write_tar(path, samples)
    return path.read_bytes()


def test_damage_yields_the_members_before_it_then_says_where(tmp_path):
    data = _tar_bytes(tmp_path, [good_sample(0), good_sample(1)])
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        members = {m.name: m for m in t.getmembers()}
    cut_member = members["000001.jpg"]
    # Cut inside 000001.jpg's data: its header is intact, so the error names it.
    got = []
    with pytest.raises(TarTruncated, match="inside member") as info:
        for name, member in read_tar(io.BytesIO(data[:cut_member.offset_data + 10])):
            got.append((name, member))
    assert [n for n, _ in got] == ["000000.jpg", "000000.txt"] and got[0][1] == jpeg(0)
    assert info.value.name == "000001.jpg"
    # Cut inside a header: no member is named.
    with pytest.raises(TarTruncated, match="inside a header") as info:
        list(read_tar(io.BytesIO(data[:cut_member.offset + 100])))
    assert info.value.name is None
    # A damaged header (checksum mismatch) stops the reading there.
    bad = bytearray(data)
    bad[cut_member.offset + 10] ^= 0xFF
    with pytest.raises(TarTruncated, match="checksum"):
        list(read_tar(io.BytesIO(bytes(bad))))
    # A stream without the end-of-archive blocks is complete.
    end = members["000001.txt"].offset_data + 512
    assert [n for n, _ in read_tar(io.BytesIO(data[:end]))] == ["000000.jpg", "000000.txt", "000001.jpg",
                                                                 "000001.txt"]
