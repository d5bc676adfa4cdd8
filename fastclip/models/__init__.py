"""Named CLIP configs, ``create_model`` and open_clip-compatible checkpoints.

    import fastclip
    fastclip.list_models()                                   # ['ViT-B-16', 'ViT-B-32', ..., 'RN50', 'RN101']
    model = fastclip.create_model("ViT-S-16", image_size=64, mask_ratio=0.5)
"""
from .clip import CLIP
from .config import CLIPConfig, TextConfig, VisionConfig, get_model_config, list_models, register_model
from .factory import clean_state_dict, create_model, load_checkpoint, read_checkpoint

__all__ = ["CLIP", "CLIPConfig", "VisionConfig", "TextConfig", "create_model", "list_models", "get_model_config",
           "register_model", "load_checkpoint", "read_checkpoint", "clean_state_dict"]
