"""open_clip's code as a test oracle, without ``import open_clip`` (which needs torchvision): the
loaders live in :mod:`fastclip.testing`, shared with the benchmarks."""
from fastclip.testing import load_open_clip_file, open_clip_model, open_clip_model_module

__all__ = ["open_clip_model", "open_clip_model_module", "open_clip_tokenizer_module"]


def open_clip_tokenizer_module():
    """(open_clip's ``tokenizer`` module loaded standalone, None) or (None, reason)."""
    return load_open_clip_file("tokenizer")
