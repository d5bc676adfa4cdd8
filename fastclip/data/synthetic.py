"""A captioned image dataset that needs no download: rendered scenes of coloured shapes.

Each image shows one or two shapes (5 shapes x 6 colours, small or large) on a plain background,
with a compositional caption::

    "a small red triangle above a large blue circle on a white background"

and a class label (the colour and shape of the first-named object: 30 classes, ``CLASSNAMES``)
for zero-shot evaluation with ``TEMPLATES`` (prompts in the captions' words, e.g. "a small {} on a
white background", averaged over sizes and backgrounds).  ``caption_noise`` is the fraction of captions that
are corrupted or mismatched (another scene's caption, a wrong colour or shape, shuffled words, or
a generic web caption), so that "small clean data beats large noisy data" can be reproduced at
toy scale; ``json["caption_ok"]`` says which.

Written as real webdataset shards of JPEGs (``<key>.jpg``, ``.txt``, ``.json``, ``.cls``) plus a
``meta.json`` with the knobs, the shard pattern, class names and templates.  Every sample is
drawn from its own RNG (seed, index), so the data do not depend on the sharding.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
import time
from typing import Optional

__all__ = ["SHAPES", "COLORS", "BACKGROUNDS", "CLASSNAMES", "TEMPLATES", "sample_scene", "describe",
           "render_scene", "make_shapes_dataset"]

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220), "yellow": (235, 215, 30),
          "purple": (140, 50, 170), "orange": (245, 140, 20)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SIZES = {"small": 0.36, "large": 0.56}  # of the image side: large enough that shapes differ at 32 px
RELATIONS = ("above", "below", "to the left of", "to the right of")
CLASSNAMES = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
# Zero-shot prompts in the captions' own words: a single-object caption reads "a small red circle
# on a white background", so each class is prompted at both sizes on all three backgrounds and the
# six embeddings are averaged (generic prompts such as "a picture of a {}." use words the captions
# never contain, which a model trained on these captions cannot read).
TEMPLATES = tuple(f"a {size} {{}} on a {bg} background" for size in ("small", "large")
                  for bg in ("white", "black", "gray"))
GENERIC_CAPTIONS = ("an image", "a picture", "untitled", "IMG_0423.JPG", "click here to see more",
                    "stock photo", "download wallpaper", "view full size")
CORRUPTIONS = ("mismatch", "attribute", "shuffle", "generic")


def sample_scene(rng: random.Random, max_objects: int = 2) -> dict:
    """A scene: background, one or two objects (shape, colour, size, centre in [0, 1]^2), relation."""
    n = 1 if max_objects < 2 else rng.choice((1, 2))
    objs = [{"shape": rng.choice(SHAPES), "color": rng.choice(tuple(COLORS)),
             "size": rng.choice(tuple(SIZES))} for _ in range(n)]
    scene = {"background": rng.choice(tuple(BACKGROUNDS)), "objects": objs, "relation": None}
    if n == 1:
        r = SIZES[objs[0]["size"]] / 2
        objs[0]["x"], objs[0]["y"] = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)
        return scene
    rel = rng.choice(RELATIONS)
    scene["relation"] = rel
    first, second = objs
    # The first object sits in one half, the second in the other, along the relation's axis.
    along = "y" if rel in ("above", "below") else "x"
    across = "x" if along == "y" else "y"
    first_low = rel in ("above", "to the left of")  # smaller coordinate = top / left
    for obj, low in ((first, first_low), (second, not first_low)):
        r = SIZES[obj["size"]] / 2
        obj[along] = rng.uniform(r, 0.5 - r + 0.02) if low else rng.uniform(0.5 + r - 0.02, 1 - r)
        obj[across] = rng.uniform(r, 1 - r)
    return scene


def describe(scene: dict, detail: Optional[tuple] = None) -> str:
    """The caption of ``scene``.  ``detail``: which optional words to say, as (size of each object...,
    background) booleans (see :func:`draw_detail`); None says everything."""
    objs = scene["objects"]
    say = detail if detail is not None else (True,) * (len(objs) + 1)

    def one(o, with_size):
        return f"a {o['size']} {o['color']} {o['shape']}" if with_size else f"a {o['color']} {o['shape']}"
    text = one(objs[0], say[0]) if len(objs) == 1 else \
        f"{one(objs[0], say[0])} {scene['relation']} {one(objs[1], say[1])}"
    return f"{text} on a {scene['background']} background" if say[-1] else text


def draw_detail(scene: dict, rng: random.Random, caption_detail: float) -> tuple:
    """Which optional words a caption says: each object's size and the background, each with
    probability ``caption_detail`` (colour, shape and the relation are always said)."""
    return tuple(rng.random() < caption_detail for _ in range(len(scene["objects"]) + 1))


def _corrupt(caption: str, scene: dict, rng: random.Random, max_objects: int, detail: tuple) -> tuple[str, str]:
    kind = rng.choice(CORRUPTIONS)
    if kind == "mismatch":
        other = sample_scene(rng, max_objects)
        other_detail = detail[:1] * len(other["objects"]) + detail[-1:]
        while describe(other, other_detail) == caption:
            other = sample_scene(rng, max_objects)
            other_detail = detail[:1] * len(other["objects"]) + detail[-1:]
        return describe(other, other_detail), kind
    if kind == "attribute":
        wrong = dict(scene, objects=[dict(o) for o in scene["objects"]])
        obj = wrong["objects"][0]
        if rng.random() < 0.5:
            obj["color"] = rng.choice([c for c in COLORS if c != obj["color"]])
        else:
            obj["shape"] = rng.choice([s for s in SHAPES if s != obj["shape"]])
        return describe(wrong, detail), kind
    if kind == "shuffle":
        words = caption.split()
        for _ in range(10):
            rng.shuffle(words)
            if " ".join(words) != caption:
                break
        return " ".join(words), kind
    return rng.choice(GENERIC_CAPTIONS), kind


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list:
    if shape == "triangle":
        angles = [rot - math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "cross":
        t = r / 3
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]  # square


def render_scene(scene: dict, image_size: int = 64, rng: Optional[random.Random] = None):
    """PIL RGB image of ``scene``, drawn at 2x and downsampled (anti-aliased edges); ``rng`` adds
    small colour jitter so that no two pixels of a class are identical."""
    from PIL import Image, ImageDraw
    rng = rng or random.Random(0)
    big = 2 * image_size

    def jitter(rgb, amount):
        return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)
    img = Image.new("RGB", (big, big), jitter(BACKGROUNDS[scene["background"]], 10))
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        r = SIZES[o["size"]] * (1 + rng.uniform(-0.08, 0.08)) * big / 2
        cx, cy = o["x"] * big, o["y"] * big
        fill = jitter(COLORS[o["color"]], 20)
        if o["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(o["shape"], cx, cy, r, rng.uniform(-0.15, 0.15)), fill=fill)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


def make_shapes_dataset(out_dir: str, num_samples: int = 10000, image_size: int = 64, seed: int = 0,
                        caption_noise: float = 0.0, samples_per_shard: int = 1000, max_objects: int = 2,
                        jpeg_quality: int = 90, prefix: str = "shard", caption_detail: float = 0.5) -> dict:
    """Write ``num_samples`` rendered, captioned scenes as webdataset shards under ``out_dir``.

    Returns (and writes to ``out_dir/meta.json``) the metadata: knobs, the brace pattern of the
    shards (``meta["shards"]``, relative to ``out_dir``; ``meta["shards_path"]`` absolute),
    ``classnames``, ``templates``, the number of corrupted captions and the time taken.
    """
    from .writer import ShardWriter
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if not 0.0 <= caption_noise <= 1.0:
        raise ValueError(f"caption_noise must be a fraction in [0, 1], got {caption_noise}")
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects must be 1 or 2, got {max_objects}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not 0.0 <= caption_detail <= 1.0:
        raise ValueError(f"caption_detail must be a probability in [0, 1], got {caption_detail}")
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    n_shards = (num_samples + samples_per_shard - 1) // samples_per_shard
    width = max(5, len(str(n_shards - 1)))
    writer = ShardWriter(os.path.join(out_dir, f"{prefix}-%0{width}d.tar"), samples_per_shard)
    corrupted = {k: 0 for k in CORRUPTIONS}
    with writer:
        for i in range(num_samples):
            rng = random.Random(f"fastclip-shapes-{seed}-{i}")
            scene = sample_scene(rng, max_objects)
            # The optional words come from their own stream: the images do not depend on caption_detail.
            detail = draw_detail(scene, random.Random(f"fastclip-shapes-detail-{seed}-{i}"), caption_detail)
            true_caption = describe(scene, detail)
            caption, kind = true_caption, None
            if rng.random() < caption_noise:
                caption, kind = _corrupt(true_caption, scene, rng, max_objects, detail)
                corrupted[kind] += 1
            first = scene["objects"][0]
            label = CLASSNAMES.index(f"{first['color']} {first['shape']}")
            buf = io.BytesIO()
            render_scene(scene, image_size, rng).save(buf, "JPEG", quality=jpeg_quality)
            meta = {"caption": caption, "label": label, "classname": CLASSNAMES[label],
                    "caption_ok": kind is None, "corruption": kind, "true_caption": true_caption,
                    "scene": scene}
            writer.write(f"{i:08d}", {"jpg": buf.getvalue(), "txt": caption, "json": json.dumps(meta),
                                      "cls": str(label)})
    braces = f"{{{0:0{width}d}..{n_shards - 1:0{width}d}}}"
    info = {
        "name": "fastclip-shapes", "num_samples": num_samples, "image_size": image_size, "seed": seed,
        "caption_noise": caption_noise, "caption_detail": caption_detail, "max_objects": max_objects,
        "samples_per_shard": samples_per_shard,
        "shards": f"{prefix}-{braces}.tar",
        "shards_path": os.path.join(os.path.abspath(out_dir), f"{prefix}-{braces}.tar"),
        "num_corrupted": sum(corrupted.values()), "corrupted_by_kind": corrupted,
        "classnames": list(CLASSNAMES), "templates": list(TEMPLATES),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info
