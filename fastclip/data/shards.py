"""The webdataset shards API gathered in one place; each piece lives in a module of its own.

    ``DataStats``                                       fastclip.data.stats
    ``expand_shards``                                   fastclip.data.shardlist
    ``read_tar``                                        fastclip.data.tar
    ``check_image_bytes``, ``image_mode``,
    ``image_dimensions``, ``RGB_MODES``                 fastclip.data.sniff
    ``Sample``, ``iter_shard``, ``IMAGE_EXTS``          fastclip.data.samples
    ``ShardSource``                                     fastclip.data.source
    ``ShardWriter``                                     fastclip.data.writer
    ``split_slots``                                     fastclip.distributed.slots

A shard is a plain tar in which the members that share a key form one sample (an image, a
caption, optionally a label).  Bad input never crashes the reader and never loses a good sample:
what is skipped is counted per reason in :class:`DataStats`.  The contracts are in the modules'
docstrings.  Code outside ``fastclip.data`` may import from here; ``fastclip.data``'s own modules
import from the modules above.
"""
from ..distributed.slots import split_slots
from .samples import IMAGE_EXTS, Sample, iter_shard
from .shardlist import expand_shards
from .sniff import RGB_MODES, check_image_bytes, image_dimensions, image_mode
from .source import ShardSource
from .stats import DataStats
from .tar import read_tar
from .writer import ShardWriter

__all__ = [
    "IMAGE_EXTS", "DataStats", "Sample", "expand_shards", "read_tar", "iter_shard",
    "ShardSource", "ShardWriter", "check_image_bytes", "image_mode", "image_dimensions", "RGB_MODES",
    "split_slots",
]
