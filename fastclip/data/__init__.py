"""Data: webdataset shards, the DALI and PIL loaders, augmentation presets, the built-in captioned
dataset (quality filtering, which needs a model, is fastclip.eval).

Importing this package imports neither PIL nor DALI; the loader backends are registered as the op
``data_loader`` in ``fastclip.ops.dispatch`` (so ``fastclip.info`` lists them with their reasons).

    loader = fastclip.data.ClipLoader("data/{00000..00009}.tar", batch_size=256, image_size=224,
                                      augment="clip_aug")
    for images, tokens in loader:         # [B, 3, 224, 224] float, [B, 77] long
        out = model(images, tokens)
    loader.stats.as_dict()                # delivered / skipped per reason, for the trainer's log
    state = loader.state_dict()           # in a checkpoint; a new loader's load_state_dict(state)
                                          # continues inside the epoch, the same batches bit for bit
"""
from .augment import CLIP_MEAN, CLIP_STD, PRESETS, AugmentConfig, augment_batch
from .loader import ClipLoader, backend_reasons, default_tokenizer, make_loader, select_backend
from .samples import Sample, iter_shard
from .shardlist import expand_shards
from .source import ShardSource
from .stats import DataStats
from .synthetic import CLASSNAMES, TEMPLATES, make_shapes_dataset, render_scene
from .writer import ShardWriter

__all__ = [
    "AugmentConfig", "PRESETS", "CLIP_MEAN", "CLIP_STD", "augment_batch",
    "ClipLoader", "make_loader", "select_backend", "backend_reasons", "default_tokenizer",
    "DataStats", "Sample", "ShardSource", "ShardWriter", "expand_shards", "iter_shard",
    "make_shapes_dataset", "render_scene", "CLASSNAMES", "TEMPLATES",
]

