"""Image-text retrieval: recall@k in both directions, chunked so memory stays O(chunk * N).

    metrics = evaluate_retrieval(model, loader)   # caption i describes image i
    metrics = retrieval_metrics(image_features, text_features, text_to_image)   # several captions

Tie rule (the pessimistic one, shared with :mod:`fastclip.eval.zero_shot`): a query is a hit at
``k`` iff fewer than ``k`` *wrong* candidates score greater than or equal to its best correct
candidate.  Exact ties count against the correct item: under a collapsed model (every feature
equal) a query misses at every ``k`` up to its number of wrong candidates, never a perfect score,
and the result still depends neither on the order of the candidates nor on how a sort breaks ties.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from .common import (autocast_context, check_index_vector, eval_mode, is_integer_tensor, iterate_batches, model_device,
                     model_dtype)

__all__ = ["retrieval_metrics", "retrieval_metrics_reference", "evaluate_retrieval"]


def _check(image_features, text_features, text_to_image, ks, chunk_size: Optional[int] = None):
    """Validated (image_features, text_features, text_to_image, ks), in the scoring dtype, on
    image_features' device."""
    for name, x in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor [N, D], got {x.dtype} {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf (a diverged model?); ranks would be meaningless")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"image_features and text_features must have the same feature dim, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    ni, nt = image_features.shape[0], text_features.shape[0]
    check_index_vector("text_to_image", text_to_image, "[Nt]", nt, "entries", "text", "text_features")
    bad = (text_to_image < 0) | (text_to_image >= ni)
    if bad.any():
        raise ValueError(f"text_to_image must index images in [0, {ni}), "
                         f"got {text_to_image[bad][:5].tolist()}")
    captions = torch.bincount(text_to_image.long(), minlength=ni)
    if (captions == 0).any():
        missing = (captions == 0).nonzero().flatten()
        raise ValueError(f"text_to_image: {missing.numel()} of the {ni} images have no caption (first: "
                         f"{missing[:5].tolist()}); image-to-text recall needs at least one per image")
    ks = [ks] if isinstance(ks, int) else list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    # float32 scores (float64 when an input is float64, e.g. for exact comparisons in tests).
    dtype = torch.float64 if torch.float64 in (image_features.dtype, text_features.dtype) else torch.float32
    device = image_features.device
    img = F.normalize(image_features.to(dtype), dim=-1)
    txt = F.normalize(text_features.to(device, dtype), dim=-1)
    return img, txt, text_to_image.to(device).long(), sorted(set(ks))


def _metrics(i2t_wrong: torch.Tensor, t2i_wrong: torch.Tensor, ks: Sequence[int]) -> dict:
    """Recalls from each query's count of wrong candidates scoring >= its best correct one."""
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = (i2t_wrong < k).double().mean().item()
    for k in ks:
        out[f"text_to_image_R@{k}"] = (t2i_wrong < k).double().mean().item()
    out["num_images"] = i2t_wrong.shape[0]
    out["num_texts"] = t2i_wrong.shape[0]
    return out


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024) -> dict:
    """Recall@k for image->text and text->image retrieval.

    Args:
        image_features: ``[Ni, D]`` float; text_features: ``[Nt, D]`` float (both L2-normalised here).
        text_to_image: ``[Nt]`` integer: the index of the image caption t describes.  Several
            captions per image are allowed; every image needs at least one.
        ks: the k of recall@k; a k at or above the number of candidates gives 1.0.
        chunk_size: query rows scored at a time: memory O(chunk_size * max(Ni, Nt)); the full
            ``Ni x Nt`` similarity matrix is never built.

    Hits (the pessimistic tie rule): text t is a hit at k iff fewer than k *other* images score
    >= its image; image i is a hit at k iff fewer than k *wrong* captions (captions of other
    images) score >= i's best scoring caption (so: any of its captions in the top k; its own
    captions never count against it).  Ties with a wrong item count against the query: with
    every score equal, text t is a hit iff Ni - 1 < k and image i iff (Nt - its captions) < k.

    Returns ``{"image_to_text_R@1", ..., "text_to_image_R@1", ..., "num_images", "num_texts"}``,
    recalls as fractions in [0, 1].
    """
    img, txt, t2i, ks = _check(image_features, text_features, text_to_image, ks, chunk_size)
    ni, nt = img.shape[0], txt.shape[0]
    i2t_wrong = torch.empty(ni, dtype=torch.long, device=img.device)
    for lo in range(0, ni, chunk_size):
        hi = min(lo + chunk_size, ni)
        sims = img[lo:hi] @ txt.t()  # [c, Nt]
        own = t2i[None, :] == torch.arange(lo, hi, device=img.device)[:, None]
        best = sims.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)
        i2t_wrong[lo:hi] = ((sims >= best) & ~own).sum(dim=1)  # other images' captions at or above
    t2i_wrong = torch.empty(nt, dtype=torch.long, device=img.device)
    for lo in range(0, nt, chunk_size):
        hi = min(lo + chunk_size, nt)
        sims = txt[lo:hi] @ img.t()  # [c, Ni]
        correct = sims.gather(1, t2i[lo:hi, None])
        t2i_wrong[lo:hi] = (sims >= correct).sum(dim=1) - 1  # other images at or above (- its own)
    return _metrics(i2t_wrong, t2i_wrong, ks)


def retrieval_metrics_reference(image_features: torch.Tensor, text_features: torch.Tensor,
                                text_to_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """:func:`retrieval_metrics` from the full ``[Ni, Nt]`` similarity matrix (the tests' oracle).

    Same arguments (no ``chunk_size``), same (pessimistic) tie rule, same dict.
    """
    img, txt, t2i, ks = _check(image_features, text_features, text_to_image, ks)
    sims = img @ txt.t()  # [Ni, Nt]
    positive = torch.zeros_like(sims, dtype=torch.bool)
    positive[t2i, torch.arange(txt.shape[0], device=sims.device)] = True
    # image -> text: the best positive of each row, against the row's negatives;
    # text -> image: the positive of each column, against the column's negatives.
    best = torch.where(positive, sims, torch.full_like(sims, float("-inf"))).max(dim=1).values
    i2t_wrong = ((sims >= best[:, None]) & ~positive).sum(dim=1)
    correct = sims[t2i, torch.arange(txt.shape[0], device=sims.device)]  # [Nt]
    t2i_wrong = ((sims >= correct[None, :]) & ~positive).sum(dim=0)
    return _metrics(i2t_wrong, t2i_wrong, ks)


def _images_and_tokens(batch, index: int):
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(f"batches must yield tuples (images, tokens, ...); batch {index} is "
                         f"{type(batch).__name__}")
    images, tokens = batch[0], batch[1]
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"batch {index}: the first item must be the images tensor, "
                        f"got {type(images).__name__}")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or not is_integer_tensor(tokens):
        what = (f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor)
                else type(tokens).__name__)
        raise ValueError(f"batch {index}: the second item must be the tokens, an integer tensor [B, L], "
                         f"got {what}")
    if tokens.shape[0] != images.shape[0]:
        raise ValueError(f"batch {index}: {tokens.shape[0]} captions for {images.shape[0]} images "
                         f"(one caption per image expected)")
    return images, tokens


def _caption_lines(batch, index: int, num_images: int) -> list:
    """Each image's captions: the non-empty lines of its text in the batch's meta dict."""
    meta = batch[-1]
    texts = meta.get("captions") if isinstance(meta, dict) else None
    if not isinstance(texts, (list, tuple)) or len(texts) != num_images:
        raise ValueError(f"batch {index}: with a tokenizer, the last item must be the loader's meta dict "
                         f"with the {num_images} images' texts under 'captions' "
                         "(ClipLoader(return_meta=True))")
    return [[line.strip() for line in text.split("\n") if line.strip()] for text in texts]


def evaluate_retrieval(model: torch.nn.Module, batches: Iterable, *, device=None,
                       autocast_dtype: Optional[torch.dtype] = None, max_batches: Optional[int] = None,
                       progress: bool = False, chunk_size: int = 1024,
                       tokenizer: Optional[Callable] = None) -> dict:
    """Image-text retrieval recall of ``model`` over ``batches``, one caption per image, or several
    with ``tokenizer``.

    Args:
        model: has ``encode_image(images [B, 3, S, S], normalize=True) -> [B, D]`` and
            ``encode_text(tokens [B, L], normalize=True) -> [B, D]``.
        batches: an iterable of ``(images, tokens, ...)`` (e.g. a ``ClipLoader(train=False)``);
            caption j of the whole set describes image j.
        device: default the model's device.  autocast_dtype: None, torch.float16 or
            torch.bfloat16 (``torch.autocast`` around both towers).
        max_batches: stop after this many batches.  progress: a tqdm bar, if tqdm is installed.
        chunk_size: for :func:`retrieval_metrics`.
        tokenizer: several captions per image: each batch ends with the loader's meta dict
            (``ClipLoader(return_meta=True)``) and each non-empty line of ``meta["captions"][j]``
            is a caption of the batch's image j, tokenised with ``tokenizer`` (a batch whose
            texts have one line each keeps its own tokens).

    Runs under ``torch.no_grad()`` in eval mode (training flags restored).  Returns
    :func:`retrieval_metrics`' dict with ks (1, 5, 10); ValueError if ``batches`` gives no samples.
    """
    device = model_device(model, device)
    autocast_context(device, autocast_dtype)  # validate before reading any batch
    dtype = model_dtype(model)
    image_feats, text_feats, counts = [], [], []
    batches_in = iterate_batches(batches, max_batches, progress, "retrieval")
    with eval_mode(model), torch.no_grad(), batches_in as source:
        for index, batch in enumerate(source):
            images, tokens = _images_and_tokens(batch, index)
            per_image = torch.ones(images.shape[0], dtype=torch.long)
            if tokenizer is not None:
                lines = _caption_lines(batch, index, images.shape[0])
                per_image = torch.tensor([len(c) for c in lines], dtype=torch.long)
                if bool((per_image != 1).any()):
                    tokens = tokenizer([c for caps in lines for c in caps]).long()
            images, tokens = images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
            if autocast_dtype is None and images.is_floating_point() and dtype is not None:
                images = images.to(dtype)
            with autocast_context(device, autocast_dtype):
                fi = model.encode_image(images, normalize=True)
                ft = model.encode_text(tokens, normalize=True)
            image_feats.append(fi.float())
            text_feats.append(ft.float())
            counts.append(per_image)
    if not image_feats or sum(f.shape[0] for f in image_feats) == 0:
        raise ValueError("batches: the evaluation set is empty (no batches, or only empty ones)")
    image_features, text_features = torch.cat(image_feats), torch.cat(text_feats)
    counts = torch.cat(counts)
    text_to_image = torch.repeat_interleave(torch.arange(counts.numel()), counts).to(image_features.device)
    return retrieval_metrics(image_features, text_features, text_to_image, chunk_size=chunk_size)
