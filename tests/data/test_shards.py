"""fastclip.data.shards: the shards API gathered in one place, each name its home module's object."""
import importlib

from fastclip.data import shards

HOMES = {
    "DataStats": "fastclip.data.stats", "expand_shards": "fastclip.data.shardlist",
    "read_tar": "fastclip.data.tar", "check_image_bytes": "fastclip.data.sniff",
    "image_mode": "fastclip.data.sniff", "image_dimensions": "fastclip.data.sniff",
    "RGB_MODES": "fastclip.data.sniff", "IMAGE_EXTS": "fastclip.data.samples",
    "Sample": "fastclip.data.samples", "iter_shard": "fastclip.data.samples",
    "ShardSource": "fastclip.data.source", "ShardWriter": "fastclip.data.writer",
    "split_slots": "fastclip.distributed.slots",
}


def test_every_name_is_re_exported_from_its_home():
    assert sorted(shards.__all__) == sorted(HOMES)
    for name, home in HOMES.items():
        module = importlib.import_module(home)
        assert name in module.__all__, (name, home)
        assert getattr(shards, name) is getattr(module, name), name
