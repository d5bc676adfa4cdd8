"""open_clip's model code as a test oracle, without ``import open_clip`` (whose package import needs
torchvision, which has no CPU wheel here).

``open_clip/model.py`` and the modules it imports need torchvision for one name only
(``torchvision.ops.misc.FrozenBatchNorm2d``, used when freezing BatchNorm, never at construction).
The installed package directory is mounted under a private package name (its ``__init__`` is not
run), and, only if torchvision cannot be imported, a stand-in module providing that one name is
put in ``sys.modules`` for the duration of the import and removed afterwards.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types

from fastclip.testing import load_open_clip_file, open_clip_dir

_PKG = "_fastclip_test_open_clip"


@functools.lru_cache(maxsize=None)
def open_clip_model_module():
    """(open_clip's ``model`` module, None) or (None, reason it cannot be loaded)."""
    root, why = open_clip_dir()
    if root is None:
        return None, why
    fakes = {}
    if importlib.util.find_spec("torchvision") is None:
        tv, ops, misc = (types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc"))

        class FrozenBatchNorm2d:  # never instantiated by model construction
            def __init__(self, *a, **k):
                raise RuntimeError("stand-in torchvision: FrozenBatchNorm2d is not available in tests")

        misc.FrozenBatchNorm2d = FrozenBatchNorm2d
        tv.ops, ops.misc = ops, misc
        fakes = {"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc}
    pkg = types.ModuleType(_PKG)
    pkg.__path__ = [root]
    saved = {k: sys.modules.get(k) for k in fakes}
    sys.modules.update(fakes)
    sys.modules[_PKG] = pkg
    try:
        mod = importlib.import_module(f"{_PKG}.model")
    except Exception as exc:  # a changed open_clip layout: skip with the reason
        return None, f"cannot load open_clip/model.py: {type(exc).__name__}: {exc}"
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod, None


def open_clip_tokenizer_module():
    """(open_clip's ``tokenizer`` module loaded standalone, None) or (None, reason)."""
    return load_open_clip_file("tokenizer")


def open_clip_model(config, **kwargs):
    """open_clip's CLIP built from a fastclip CLIPConfig (same widths, depths, heads, sizes)."""
    mod, why = open_clip_model_module()
    if mod is None:
        raise RuntimeError(why)
    d = config.to_dict()
    for k in ("mask_ratio", "mask_mode"):
        d["vision_cfg"].pop(k)
    return mod.CLIP(d["embed_dim"], d["vision_cfg"], d["text_cfg"], quick_gelu=config.quick_gelu,
                    output_dict=True, **kwargs)
