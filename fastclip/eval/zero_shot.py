"""Zero-shot classification: a text classifier built from class names and prompt templates.

    classifier = zero_shot_classifier(model, CLASSNAMES, TEMPLATES)          # [D, C]
    metrics = evaluate_zero_shot(model, loader, CLASSNAMES, TEMPLATES)        # {"top1", "top5", ...}

``loader`` is any iterable of ``(images, labels)`` or ``(images, tokens, labels)`` batches, e.g.
``fastclip.data.ClipLoader(..., train=False, with_labels=True)``.  Everything runs under
``torch.no_grad()`` with the model in eval mode; the model's training flags (every submodule's)
are restored afterwards, so a trainer can call these between steps.

Rank rule (the pessimistic one, shared with :mod:`fastclip.eval.retrieval`): a sample is a hit at
``k`` iff fewer than ``k`` *other* classes score greater than or equal to its true class.  Exact
ties count against the true class: a collapsed model (every logit equal) scores 0 at every
``k < C``, never a perfect score, and the result still does not depend on the order of the
classes or on how ``torch.topk`` breaks ties.  ``mean_per_class_recall`` uses the same top-1 rule.

The helpers the evaluation loops share (:func:`eval_mode`, :func:`model_device`, ...) live in
:mod:`fastclip.eval.common`.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .common import (autocast_context, check_features, check_index_vector, encode_labelled_images, eval_mode,
                     model_device)

__all__ = ["zero_shot_classifier", "zero_shot_metrics", "evaluate_zero_shot"]

Template = Union[str, Callable[[str], str]]


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (half inputs are scored in float32)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


# ----------------------------------------------------------------------------------------------
# The classifier
# ----------------------------------------------------------------------------------------------
def _fill(template: Template, classname: str, index: int) -> str:
    if callable(template):
        text = template(classname)
        if not isinstance(text, str):
            raise TypeError(f"templates[{index}] is a callable and must return a str, "
                            f"got {type(text).__name__}")
        return text
    if not isinstance(template, str):
        raise TypeError(f"templates[{index}] must be a str with '{{}}' or a callable, "
                        f"got {type(template).__name__}")
    text = template.format(classname)
    if text == template:
        raise ValueError(f"templates[{index}] = {template!r} has no '{{}}' placeholder for the class name")
    return text


def _check_names(name: str, values) -> list:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence (list or tuple), got {type(values).__name__}")
    if len(values) == 0:
        raise ValueError(f"{name} must not be empty")
    return list(values)


@torch.no_grad()
def zero_shot_classifier(model: torch.nn.Module, classnames: Sequence[str], templates: Sequence[Template],
                         tokenizer: Optional[Callable] = None, *, device=None,
                         batch_size: int = 256) -> torch.Tensor:
    """The zero-shot weights: one unit-norm text embedding per class, float32 ``[D, C]``.

    Args:
        model: has ``encode_text(tokens [B, L]) -> [B, D]`` (a :class:`fastclip.CLIP`).
        classnames: C class names.
        templates: T prompt templates: strings with ``{}`` (``"a photo of a {}."``), filled by
            ``template.format(classname)``, or callables ``classname -> str``.
        tokenizer: texts -> LongTensor ``[B, L]``; default ``fastclip.get_tokenizer()`` at the
            model's context length (77 for every built-in config).
        device: where the tokens go; default the model's device.
        batch_size: prompts per ``encode_text`` call (all C * T prompts are batched together).

    Column ``c`` is ``normalize(mean_t normalize(encode_text(templates[t] filled with classnames[c])))``.
    Runs under ``torch.no_grad()`` in eval mode and restores the model's training flags.
    """
    classnames = _check_names("classnames", classnames)
    templates = _check_names("templates", templates)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    for i, c in enumerate(classnames):
        if not isinstance(c, str):
            raise TypeError(f"classnames[{i}] must be a str, got {type(c).__name__}")
    prompts = [_fill(t, c, i) for c in classnames for i, t in enumerate(templates)]  # class-major
    if tokenizer is None:
        from ..tokenizer import get_tokenizer
        config = getattr(model, "config", None)
        context_length = getattr(getattr(config, "text_cfg", None), "context_length", None)
        tokenizer = get_tokenizer(context_length=context_length)
    device = model_device(model, device)
    chunks = []
    with eval_mode(model):
        for lo in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[lo:lo + batch_size])
            feats = model.encode_text(torch.as_tensor(tokens).to(device))
            chunks.append(F.normalize(feats.float(), dim=-1))
    per_prompt = torch.cat(chunks)  # [C * T, D]
    means = per_prompt.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(means, dim=-1).t().contiguous()


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def _check_ks(ks) -> list:
    ks = [ks] if isinstance(ks, int) else list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks!r}")
    return sorted(set(ks))


def _check_labels(labels, n: int, num_classes: int) -> torch.Tensor:
    check_index_vector("labels", labels, "[N]", n, "labels", "image", "image_features")
    unlabelled = int((labels == -1).sum())
    if unlabelled:
        raise ValueError(f"labels: evaluation set without labels: {unlabelled} of the {n} labels are -1 "
                         f"(unlabelled); zero-shot accuracy needs a class label for every sample")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise ValueError(f"labels must be in [0, {num_classes}) (classifier has {num_classes} classes), got "
                         f"{labels[bad][:5].tolist()}")
    return labels.long()


def zero_shot_metrics(image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                      ks: Sequence[int] = (1, 5)) -> dict:
    """Accuracy of ``normalize(image_features) @ classifier`` against ``labels``.

    Args:
        image_features: ``[N, D]`` float (normalised here).
        labels: ``[N]`` integer class indices in ``[0, C)``; -1 (unlabelled) raises ValueError.
        classifier: ``[D, C]`` (from :func:`zero_shot_classifier`; used as given).
        ks: top-k accuracies to report; ``"top{k}"`` only for ``k <= C``.

    Returns ``{"top1": ..., "top5": ..., "mean_per_class_recall": ..., "num_samples": N,
    "num_classes": C}``; accuracies are fractions in [0, 1].  ``mean_per_class_recall`` is the
    mean, over the classes present in ``labels``, of each class's top-1 recall.

    The tie rule is pessimistic (module docstring): a sample is a hit at k iff fewer than k of
    the *other* classes have a logit >= its true class's logit, so a tie with the true class
    counts against it.  With C classes all tied, every sample is a hit at k iff C - 1 < k.
    """
    check_features("image_features", image_features)
    check_features("classifier", classifier, "[D, C]")
    n, d = image_features.shape
    if n == 0:
        raise ValueError("image_features is empty (0 samples)")
    if classifier.shape[0] != d:
        raise ValueError(f"classifier must be [D, C] with D = image_features' dim {d}, got "
                         f"{tuple(classifier.shape)}")
    num_classes = classifier.shape[1]
    if num_classes == 0:
        raise ValueError("classifier has no classes (shape [D, 0])")
    ks = _check_ks(ks)
    dtype = _compute_dtype(image_features, classifier)
    labels = _check_labels(labels, n, num_classes).to(image_features.device)
    logits = F.normalize(image_features.to(dtype), dim=-1) @ classifier.to(image_features.device, dtype)
    correct = logits.gather(1, labels[:, None])
    # wrong classes at or above the true one (ties count against it); the true class's own logit
    # is the same number, always >= itself, hence the - 1.
    wrong = (logits >= correct).sum(dim=1) - 1
    out = {f"top{k}": (wrong < k).double().mean().item() for k in ks if k <= num_classes}
    hit1 = (wrong == 0).double()
    counts = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.bincount(labels, weights=hit1, minlength=num_classes)
    present = counts > 0
    out["mean_per_class_recall"] = (hits[present] / counts[present]).mean().item()
    out["num_samples"] = n
    out["num_classes"] = num_classes
    return out


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def evaluate_zero_shot(model: torch.nn.Module, batches: Iterable, classnames: Sequence[str],
                       templates: Sequence[Template], tokenizer: Optional[Callable] = None, *, device=None,
                       classifier: Optional[torch.Tensor] = None,
                       autocast_dtype: Optional[torch.dtype] = None, max_batches: Optional[int] = None,
                       progress: bool = False) -> dict:
    """Zero-shot accuracy of ``model`` on labelled ``batches``.

    Args:
        model: has ``encode_image(images [B, 3, S, S], normalize=True) -> [B, D]`` and, unless
            ``classifier`` is given, ``encode_text``.
        batches: an iterable of ``(images, labels)`` or ``(images, tokens, labels)`` (anything
            after them, like ClipLoader's meta dict, is ignored): images are the first item,
            labels the last 1-D integer tensor ``[B]``.
        classnames, templates, tokenizer: for :func:`zero_shot_classifier`.
        device: where images go; default the model's device.
        classifier: ``[D, C]`` precomputed weights (built once and reused across evaluations);
            ``C`` must equal ``len(classnames)``.
        autocast_dtype: None (the model's own dtype; floating images are cast to it), or
            torch.float16 / torch.bfloat16 to run the towers under ``torch.autocast``.
        max_batches: stop after this many batches (the rest of ``batches`` is not read).
        progress: a tqdm bar, if tqdm is installed.

    Returns :func:`zero_shot_metrics`' dict.  Raises ValueError when ``batches`` gives no
    samples, when a batch has no labels, or when labels are -1 (an evaluation set without labels).
    """
    classnames = _check_names("classnames", classnames)
    device = model_device(model, device)
    amp = autocast_context(device, autocast_dtype)  # validates autocast_dtype before any work
    if classifier is not None:
        check_features("classifier", classifier, "[D, C]")
        if classifier.shape[1] != len(classnames):
            raise ValueError(f"classifier must be [D, C] with C = len(classnames) = {len(classnames)}, got "
                             f"{tuple(classifier.shape)}")
    built = {}

    def build_classifier():  # while the loader prepares its first batches
        with amp:
            built["w"] = zero_shot_classifier(model, classnames, templates, tokenizer, device=device)

    image_features, all_labels = encode_labelled_images(
        model, batches, device=device, autocast_dtype=autocast_dtype, max_batches=max_batches, progress=progress,
        desc="zero-shot", on_start=None if classifier is not None else build_classifier)
    classifier = built.get("w", classifier)
    if bool((all_labels == -1).all()):
        raise ValueError(f"labels: evaluation set without labels: all {all_labels.shape[0]} labels are -1; "
                         f"zero-shot accuracy needs a dataset with class labels")
    return zero_shot_metrics(image_features, all_labels, classifier.to(device))
