"""Linear probe: a multinomial logistic regression on frozen image features.

    metrics = evaluate_linear_probe(model, train_loader, test_loader, cache_dir="feats", cache_key="cifar10")
    # {"top1", "top5", "mean_per_class_recall", "weight_decay", "n_train", "n_val", "n_test", "num_classes"}

The protocol of the published CLIP evaluations: the image tower's normalised features
(``encode_image(images, normalize=True)``, eval mode, no grad), an L2-regularised multinomial
logistic regression fitted by full-batch L-BFGS, its regularisation strength chosen on a
validation split, then the classifier refitted on train + validation with that strength and scored
once on the test set.

The objective (``N`` samples, ``C`` classes seen in the fitting set, weight ``W [C, D]``, bias ``b``)::

    mean_i cross_entropy(W x_i + b, y_i) + weight_decay / 2 * ||W||_F^2      (b is not regularised)

which is scikit-learn's ``LogisticRegression(C=C_sklearn)`` objective divided by ``C_sklearn * N``:
``weight_decay = 1 / (C_sklearn * N)``.

The search (:func:`fit_linear_probe`): every value of ``weight_decays`` (default
:data:`DEFAULT_WEIGHT_DECAYS`, 1e-6 ... 1e2, one per decade) is fitted on the train split, strongest
first, each fit warm-started from the previous solution (a regularisation path: cheap and
deterministic).  Then ``refine_steps`` bisection steps in log space: the geometric midpoints
between the best value and its evaluated neighbours are fitted, and the best is taken again; three
steps from a one-per-decade grid reach 8 values per decade, the resolution of the CLIP paper's
parametric binary search.  "Best" is the highest validation top-1 (the pessimistic tie rule below),
ties broken by the lower validation cross-entropy, then by the larger weight decay.

Scoring uses the pessimistic rank rule of :mod:`fastclip.eval.zero_shot` (its
:func:`~fastclip.eval.zero_shot.zero_shot_metrics` does the counting): a sample is a hit at ``k``
iff fewer than ``k`` other classes have a logit >= its true class's.  A class with no sample in
the fitting set gets bias ``-inf``: the probe never predicts it, and its test samples count as
misses at every ``k < C``.

Feature cache (:func:`extract_features` ``cache=``): one ``torch.save`` file holding the features,
the labels, a SHA-256 over both and the metadata they were computed under (the model fingerprint,
``max_batches``, ``autocast_dtype``).  It is used only when all of that matches and the checksum
holds; a stale, foreign, truncated or damaged file is recomputed and replaced (written to a
temporary file in the same directory, fsync'ed, then renamed over the name).  The file name is the
caller's statement of which data set it holds: the data itself is not fingerprinted.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..atomic import atomic_torch_save, checksum
from .common import autocast_context, check_features, check_index_vector, encode_labelled_images, model_device
from .zero_shot import zero_shot_metrics

__all__ = ["LinearProbe", "DEFAULT_WEIGHT_DECAYS", "model_fingerprint", "extract_features",
           "fit_linear_probe", "linear_probe_metrics", "evaluate_linear_probe"]

#: The default search grid: one value per decade from 1e-6 (almost unregularised for unit-norm
#: features) to 1e2 (weights shrunk to ~0: the classifier degenerates to the class means'
#: direction).  Past either end the validation accuracy no longer changes in practice.
DEFAULT_WEIGHT_DECAYS = tuple(10.0 ** k for k in range(-6, 3))

_CACHE_FORMAT = "fastclip-image-features"
_CACHE_VERSION = 1
# L-BFGS stopping tolerances per fitting dtype: (max |gradient|, change in loss or step).  Tighter
# ones only polish digits that no accuracy depends on: on separable data with little decay they
# cost 10-30x the iterations for the same weights to 3 digits (scikit-learn stops at 1e-4).
_TOLERANCES = {torch.float64: (1e-6, 1e-10), torch.float32: (1e-5, 1e-9)}


# ----------------------------------------------------------------------------------------------
# The probe
# ----------------------------------------------------------------------------------------------
@dataclass
class LinearProbe:
    """A fitted linear classifier: ``logits = x @ weight.T + bias``.

    Attributes:
        weight: ``[C, D]``; bias: ``[C]``, ``-inf`` for classes the fit never saw (never predicted).
        weight_decay: the chosen regularisation strength (module docstring's objective).
        search: ``{weight_decay: validation top-1}`` for every value tried, in the order tried.
        search_loss: ``{weight_decay: validation cross-entropy}`` (over validation samples of
            classes the train split has), the tie-breaker.
        n_train, n_val: samples of the train and validation splits; the final fit used both.
    """
    weight: torch.Tensor
    bias: torch.Tensor
    weight_decay: float
    search: dict = field(default_factory=dict)
    search_loss: dict = field(default_factory=dict)
    n_train: int = 0
    n_val: int = 0

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, D]`` -> ``[N, C]`` in the probe's dtype (float64 unless fitted in float32)."""
        check_features("x", x)
        if x.shape[1] != self.dim:
            raise ValueError(f"x must have the probe's feature dim {self.dim}, got {tuple(x.shape)}")
        return x.to(self.weight.device, self.weight.dtype) @ self.weight.t() + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, D]`` -> predicted classes ``[N]`` int64 (argmax of :meth:`logits`)."""
        return self.logits(x).argmax(dim=1)


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def _check_nonempty_features(name: str, x) -> torch.Tensor:
    check_features(name, x)
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    return x


def _check_labels(name: str, y, n: int, per: str, others: str,
                  num_classes: Optional[int] = None) -> torch.Tensor:
    """``y`` as int64: one label per sample, none -1 (unlabelled), all in [0, num_classes)."""
    check_index_vector(name, y, "[N]", n, "labels", per, others)
    unlabelled = int((y == -1).sum())
    if unlabelled:
        raise ValueError(f"{name}: a set without labels: {unlabelled} of the {n} labels are -1 (unlabelled); "
                         f"a linear probe needs a class label for every sample")
    if num_classes is None:
        bad, expected = y < 0, "non-negative class indices"
    else:
        bad, expected = (y < 0) | (y >= num_classes), f"class indices in [0, {num_classes})"
    if bad.any():
        raise ValueError(f"{name} must be {expected}, got {y[bad][:5].tolist()}")
    return y.long()


def _check_positive_int(name: str, value, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {kind} int, got {value!r}")
    return value


def _check_max_batches(max_batches) -> None:
    if max_batches is not None:
        _check_positive_int("max_batches", max_batches)


def _check_weight_decays(weight_decays) -> list:
    if weight_decays is None:
        return list(DEFAULT_WEIGHT_DECAYS)
    if isinstance(weight_decays, (int, float)):
        weight_decays = [weight_decays]
    values = list(weight_decays)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                         or v <= 0 for v in values):
        raise ValueError(f"weight_decays must be positive finite numbers, got {weight_decays!r}")
    return sorted({float(v) for v in values})


# ----------------------------------------------------------------------------------------------
# Features and their cache
# ----------------------------------------------------------------------------------------------
def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of ``model``'s weights, the feature cache's default key (hex SHA-256).

    Hashed: the model's class name; every state-dict entry's name, dtype and shape; and per
    tensor its float64 sum and L2 norm (rounded to 12 significant digits, so that another
    summation order, e.g. on another device, rarely changes it -- not verified on a GPU; a
    mismatch only costs a recompute) and up to 8 evenly spaced entries (exact).  Cost: two
    reductions over the weights on their own device and one small transfer (0.2 s for a
    ViT-B/16's 150M parameters on 2 CPU cores), not a hash of every byte.  Any training step or
    load of other weights changes it; weights altered so as to keep every sum, norm and sampled
    entry (a permutation of hidden units) would not.  When that matters pass ``fingerprint=`` to
    :func:`extract_features` (e.g. a checkpoint's checksum).  The whole state dict counts, the
    text tower included: a change there also recomputes image features (safe, if not minimal).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}\n".encode())
    sums, samples = [], []
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
            flat = t.detach().reshape(-1)
            if flat.is_complex():
                flat = torch.view_as_real(flat).reshape(-1)
            if flat.numel() == 0:
                continue
            flat = flat if flat.is_floating_point() else flat.to(torch.float64)
            sums.append(torch.stack([torch.sum(flat, dtype=torch.float64),
                                     torch.linalg.vector_norm(flat, dtype=torch.float64)]).cpu())
            k = min(8, flat.numel())  # evenly spaced, first and last included (integer arithmetic: exact)
            idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
            samples.append(flat[idx].to(torch.float64).cpu())
    if sums:
        h.update(" ".join(f"{v:.12e}" for v in torch.cat(sums).tolist()).encode())
        h.update(torch.cat(samples).numpy().tobytes())
    return h.hexdigest()


def _checksum(features: torch.Tensor, labels: torch.Tensor) -> str:
    return checksum({"features": features, "labels": labels})


def _load_cache(path: str, meta: dict):
    """(features, labels) from ``path`` if it is an intact cache written under ``meta``, else None
    (a warning when the file exists but is unreadable or damaged; silence when it is just stale)."""
    if not os.path.exists(path):
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, damaged pickle, not a torch file
        warnings.warn(f"fastclip.eval: feature cache {path} is unreadable ({type(exc).__name__}); "
                      f"recomputing", UserWarning, stacklevel=3)
        return None
    if not isinstance(payload, dict) or payload.get("format") != _CACHE_FORMAT:
        warnings.warn(f"fastclip.eval: {path} is not a fastclip feature cache; recomputing and replacing it",
                      UserWarning, stacklevel=3)
        return None
    if payload.get("version") != _CACHE_VERSION or payload.get("meta") != meta:
        return None  # another model, max_batches or autocast dtype: stale, not damaged
    feats, labels = payload.get("features"), payload.get("labels")
    intact = (isinstance(feats, torch.Tensor) and isinstance(labels, torch.Tensor) and feats.dim() == 2
              and feats.dtype == torch.float32 and labels.dim() == 1 and labels.dtype == torch.int64
              and feats.shape[0] == labels.shape[0] > 0
              and payload.get("checksum") == _checksum(feats, labels))
    if not intact:
        warnings.warn(f"fastclip.eval: feature cache {path} is damaged (checksum or layout); recomputing",
                      UserWarning, stacklevel=3)
        return None
    return feats, labels


def _save_cache(path: str, meta: dict, features: torch.Tensor, labels: torch.Tensor) -> None:
    payload = {"format": _CACHE_FORMAT, "version": _CACHE_VERSION, "meta": meta, "features": features,
               "labels": labels, "checksum": _checksum(features, labels)}
    atomic_torch_save(payload, path)


def _extract(model, batches, name: str, *, device, autocast_dtype, max_batches, progress, cache, fingerprint):
    if cache is not None:
        if not isinstance(cache, (str, os.PathLike)):
            raise TypeError(f"cache must be a file path (str or os.PathLike), got {type(cache).__name__}")
        if fingerprint is None:
            fingerprint = model_fingerprint(model)
        elif not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(f"fingerprint must be a non-empty str, got {fingerprint!r}")
        meta = {"fingerprint": fingerprint, "max_batches": max_batches, "autocast_dtype": str(autocast_dtype)}
        loaded = _load_cache(os.fspath(cache), meta)
        if loaded is not None:
            return loaded
    features, labels = encode_labelled_images(model, batches, device=device, autocast_dtype=autocast_dtype,
                                              max_batches=max_batches, progress=progress,
                                              desc=f"features: {name}", name=name, out_device="cpu")
    if cache is not None:
        _save_cache(os.fspath(cache), meta, features, labels)
    return features, labels


def extract_features(model: torch.nn.Module, batches: Iterable, *, device=None,
                     autocast_dtype: Optional[torch.dtype] = None, max_batches: Optional[int] = None,
                     progress: bool = False, cache=None, fingerprint: Optional[str] = None) -> tuple:
    """Normalised image features of every labelled batch: ``(features [N, D] float32 CPU,
    labels [N] int64 CPU)``.

    Args:
        model: has ``encode_image(images [B, 3, S, S], normalize=True) -> [B, D]``; run in eval
            mode under ``torch.no_grad()``, training flags restored afterwards.
        batches: ``(images, labels)`` or ``(images, tokens, labels, ...)`` tuples (labels: the last
            1-D integer tensor), e.g. ``ClipLoader(..., train=False, with_labels=True)``.
            Labels come back as they are (-1 included).
        device: where images go (default the model's).  autocast_dtype: None, torch.float16 or
            torch.bfloat16.  max_batches: only the first batches.  progress: a tqdm bar.
        cache: a file path.  If it holds features computed under the same ``fingerprint``,
            ``max_batches`` and ``autocast_dtype`` (and its checksum holds) they are returned
            without running the model; otherwise they are computed and the file is written
            atomically.  The path names the data set: the data is not fingerprinted.
        fingerprint: identifies the model for the cache; default :func:`model_fingerprint`.

    Raises ValueError for an empty set or a batch without labels.
    """
    device = model_device(model, device)
    autocast_context(device, autocast_dtype)  # validate before reading a cache or a batch
    _check_max_batches(max_batches)
    return _extract(model, batches, "batches", device=device, autocast_dtype=autocast_dtype,
                    max_batches=max_batches, progress=progress, cache=cache, fingerprint=fingerprint)


# ----------------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------------
def _objective(x, y, weight, bias, weight_decay: float) -> torch.Tensor:
    return F.cross_entropy(x @ weight.t() + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()


def _lbfgs(x: torch.Tensor, y: torch.Tensor, weight_decay: float, init: tuple, max_iter: int) -> tuple:
    """Minimise :func:`_objective` from ``init = (weight [K, D], bias [K])`` (``y`` in [0, K))."""
    weight = init[0].clone().requires_grad_(True)
    bias = init[1].clone().requires_grad_(True)
    tol_grad, tol_change = _TOLERANCES[x.dtype]
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, max_eval=2 * max_iter,
                            tolerance_grad=tol_grad, tolerance_change=tol_change, history_size=10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _objective(x, y, weight, bias, weight_decay)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def _score(x, y, weight, bias, num_classes: int, classes: torch.Tensor) -> tuple:
    """(top-1 with the pessimistic tie rule, cross-entropy over samples of ``classes``) of the
    compact fit ``(weight, bias)`` over ``classes`` on ``(x, y)``."""
    probe = _expand(weight, bias, classes, num_classes)
    top1 = linear_probe_metrics(probe, x, y)["top1"]
    compact = torch.full((num_classes,), -1, dtype=torch.long)
    compact[classes] = torch.arange(classes.numel())
    mask = compact[y] >= 0
    loss = (F.cross_entropy(x[mask] @ weight.t() + bias, compact[y[mask]]).item() if mask.any()
            else math.inf)
    return top1, loss


def _expand(weight, bias, classes, num_classes: int, **fields) -> LinearProbe:
    """A :class:`LinearProbe` over all ``num_classes`` from a fit over ``classes`` (-inf bias elsewhere)."""
    full_w = weight.new_zeros(num_classes, weight.shape[1])
    full_b = bias.new_full((num_classes,), -math.inf)
    full_w[classes], full_b[classes] = weight, bias
    return LinearProbe(full_w, full_b, **{"weight_decay": math.nan, **fields})


def fit_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                     val_y: torch.Tensor, *, num_classes: Optional[int] = None,
                     weight_decays: Optional[Sequence[float]] = None, refine_steps: int = 3,
                     max_iter: int = 1000, dtype: torch.dtype = torch.float64) -> LinearProbe:
    """Multinomial logistic regression with the weight decay chosen on ``(val_x, val_y)``, refitted
    on train + validation.

    Args:
        train_x: ``[N, D]`` float features; train_y: ``[N]`` integer labels in ``[0, C)``.
        val_x: ``[M, D]``; val_y: ``[M]``: the validation split that picks the weight decay.
        num_classes: C; default 1 + the largest label of either split.
        weight_decays: the grid searched (module docstring's objective); default
            :data:`DEFAULT_WEIGHT_DECAYS`.  One value: no search, just the refit.
        refine_steps: bisection steps in log space around the grid's best (0: grid only).
        max_iter: L-BFGS iterations per fit.
        dtype: torch.float64 (default) or torch.float32 (half the memory and time on a large set).

    Full-batch L-BFGS on CPU; the strongest decay starts from zero, every other fit from an
    earlier solution (the refit from the chosen one): deterministic for given inputs, no random
    state involved.  A best value at an end of the grid is refined inward only: widen the grid if
    :attr:`LinearProbe.search` shows it there.  Classes absent from the fitting data get bias ``-inf`` (never
    predicted); validation samples of classes the train split lacks count as misses in the search.
    Returns a :class:`LinearProbe` in ``dtype``; warns if the final fit stops before converging.
    """
    _check_nonempty_features("train_x", train_x)
    _check_nonempty_features("val_x", val_x)
    if train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"train_x and val_x must have the same feature dim, got {tuple(train_x.shape)} and "
                         f"{tuple(val_x.shape)}")
    if num_classes is not None:
        _check_positive_int("num_classes", num_classes)
    train_y = _check_labels("train_y", train_y, train_x.shape[0], "row", "rows of train_x", num_classes)
    val_y = _check_labels("val_y", val_y, val_x.shape[0], "row", "rows of val_x", num_classes)
    if num_classes is None:
        num_classes = 1 + int(max(train_y.max(), val_y.max()))
    weight_decays = _check_weight_decays(weight_decays)
    _check_positive_int("refine_steps", refine_steps, allow_zero=True)
    _check_positive_int("max_iter", max_iter)
    if dtype not in _TOLERANCES:
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype!r}")
    train_y, val_y = train_y.cpu(), val_y.cpu()
    seen = torch.unique(train_y)
    if seen.numel() < 2:
        raise ValueError(f"train_y must have at least 2 classes to fit a classifier, got {seen.tolist()}")

    xt, xv = train_x.detach().to("cpu", dtype), val_x.detach().to("cpu", dtype)
    compact = torch.full((num_classes,), -1, dtype=torch.long)
    compact[seen] = torch.arange(seen.numel())
    yt = compact[train_y]
    results = {}  # weight_decay -> (top1, loss, weight, bias), in the order tried
    start = (xt.new_zeros(seen.numel(), xt.shape[1]), xt.new_zeros(seen.numel()))

    def run(wd: float, init: tuple) -> None:
        w, b = _lbfgs(xt, yt, wd, init, max_iter)
        results[wd] = (*_score(xv, val_y, w, b, num_classes, seen), w, b)

    def best() -> float:
        return max(results, key=lambda wd: (results[wd][0], -results[wd][1], wd))

    for wd in reversed(weight_decays):  # strongest first: each fit warm-starts the next, weaker one
        run(wd, start)
        start = results[wd][2:]
    for _ in range(refine_steps):
        tried = sorted(results)
        i = tried.index(best())
        around = [tried[j] for j in (i - 1, i + 1) if 0 <= j < len(tried)]
        mids = [math.sqrt(tried[i] * other) for other in around]
        mids = [m for m in mids if m not in results]
        if not mids:
            break
        init = results[tried[i]][2:]
        for m in mids:
            run(m, init)

    chosen = best()
    # refit on train + validation, from the chosen solution (rows of classes new in val start at 0)
    x_all, y_all = torch.cat([xt, xv]), torch.cat([train_y, val_y])
    classes = torch.unique(y_all)
    full = _expand(*results[chosen][2:], seen, num_classes)
    init = (full.weight[classes], torch.where(torch.isinf(full.bias), 0.0, full.bias)[classes].to(dtype))
    compact = torch.full((num_classes,), -1, dtype=torch.long)
    compact[classes] = torch.arange(classes.numel())
    w, b = _lbfgs(x_all, compact[y_all], chosen, init, max_iter)
    _warn_unconverged(x_all, compact[y_all], w, b, chosen)
    return _expand(w, b, classes, num_classes, weight_decay=chosen,
                   search={wd: r[0] for wd, r in results.items()},
                   search_loss={wd: r[1] for wd, r in results.items()},
                   n_train=train_x.shape[0], n_val=val_x.shape[0])


def _warn_unconverged(x, y, weight, bias, weight_decay: float) -> None:
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    with torch.enable_grad():
        _objective(x, y, w, b, weight_decay).backward()
    grad = max(w.grad.abs().max().item(), b.grad.abs().max().item())
    if grad > 1e3 * _TOLERANCES[x.dtype][0]:
        warnings.warn(f"fastclip.eval: the linear probe's L-BFGS stopped before converging (max |gradient| "
                      f"{grad:.2e} at weight_decay {weight_decay:g}); raise max_iter", UserWarning,
                      stacklevel=3)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def linear_probe_metrics(probe: LinearProbe, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Accuracy of ``probe`` on ``(x [N, D], y [N])``.

    Returns :func:`~fastclip.eval.zero_shot.zero_shot_metrics`' dict: ``top1``, ``top5`` (only
    with >= 5 classes), ``mean_per_class_recall`` (over the classes present in ``y``),
    ``num_samples``, ``num_classes``.  Same pessimistic tie rule: a tie with the true class counts
    against it.  Samples of a class the probe never saw (bias -inf) are misses at every k < C.

    The counting is zero-shot's, applied to the probe's logits with an identity classifier (it
    normalises each row first: a positive per-row scale, which preserves every comparison up to
    rounding in float64).
    """
    if not isinstance(probe, LinearProbe):
        raise TypeError(f"probe must be a LinearProbe, got {type(probe).__name__}")
    _check_nonempty_features("x", x)
    y = _check_labels("y", y, x.shape[0], "row", "rows of x", probe.num_classes)
    logits = probe.logits(x).to(torch.float64)
    unseen = torch.isinf(logits)
    if unseen.any():  # -inf bias: strictly below every finite logit, and finite for the counting
        finite = logits[~unseen]
        floor = finite.min() - 1 - finite.abs().max() if finite.numel() else logits.new_tensor(0.0)
        logits = torch.where(unseen, floor, logits)
    eye = torch.eye(probe.num_classes, dtype=logits.dtype, device=logits.device)
    return zero_shot_metrics(logits, y.to(logits.device), eye)


# ----------------------------------------------------------------------------------------------
# The whole evaluation
# ----------------------------------------------------------------------------------------------
def _stratified_split(y: torch.Tensor, val_fraction: float, seed: int) -> tuple:
    """(train indices, val indices), both ascending: per class, a seeded random
    ``round(val_fraction * n_c)`` of its samples go to validation, at least one always stays in
    train (a class with a single sample stays whole)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(y.shape[0], generator=g)
    grouped = perm[torch.sort(y[perm], stable=True).indices]  # by class, random within a class
    counts = torch.bincount(y).tolist()
    val, lo = [], 0
    for n_c in counts:
        k = min(math.floor(val_fraction * n_c + 0.5), n_c - 1)
        val.append(grouped[lo:lo + max(k, 0)])
        lo += n_c
    val_idx = torch.sort(torch.cat(val)).values
    is_val = torch.zeros(y.shape[0], dtype=torch.bool)
    is_val[val_idx] = True
    return (~is_val).nonzero().flatten(), val_idx


def evaluate_linear_probe(model: torch.nn.Module, train_batches: Iterable, test_batches: Iterable, *,
                          val_batches: Optional[Iterable] = None, val_fraction: float = 0.2, device=None,
                          autocast_dtype: Optional[torch.dtype] = None, cache_dir: Optional[str] = None,
                          cache_key: Optional[str] = None, max_batches: Optional[int] = None,
                          progress: bool = False, seed: int = 0) -> dict:
    """Linear-probe accuracy of ``model``'s image features: fit on train, choose the weight decay on
    validation, refit on both, score on test.

    Args:
        model: has ``encode_image(images, normalize=True)`` (a :class:`fastclip.CLIP`).
        train_batches, test_batches, val_batches: labelled batches as for :func:`extract_features`.
            Without ``val_batches`` the train set is split: per class, a seeded random
            ``val_fraction`` of its samples (rounded; at least one stays in train) validate.
        val_fraction: in (0, 1); unused with ``val_batches``.
        device, autocast_dtype, max_batches (per set), progress: as for :func:`extract_features`.
        cache_dir: keep each set's features in ``{cache_dir}/{cache_key}-{train,val,test}.pt``
            (reused while the model's :func:`model_fingerprint` and the settings match);
            ``cache_key`` is then required and names the data set.  Without ``cache_dir``,
            ``cache_key`` is ignored.
        seed: the train/validation split's permutation.

    Classes: ``num_classes`` is 1 + the largest label of any set.  A test class the train set
    never saw is allowed: the probe cannot predict it, so its samples count as misses.

    Returns ``{"top1", "top5" (only with >= 5 classes), "mean_per_class_recall", "weight_decay",
    "n_train", "n_val", "n_test", "num_classes"}``: accuracies are fractions in [0, 1] on the test
    set; ``n_train``/``n_val`` are the sizes of the two splits (the final fit used their sum).

    Refused with ValueError before the fit (argument checks before any batch is read): an empty
    set, labels -1 (an unlabelled set) or negative, fewer than 2 classes in the train set,
    ``val_fraction`` outside (0, 1), ``cache_dir`` without a ``cache_key``, a split that leaves no
    validation sample.
    """
    if (isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float))
            or not 0 < val_fraction < 1):
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    device = model_device(model, device)
    autocast_context(device, autocast_dtype)
    _check_max_batches(max_batches)
    fingerprint = None
    if cache_dir is not None:
        if not isinstance(cache_key, str) or not cache_key or os.sep in cache_key or "/" in cache_key:
            raise ValueError(f"cache_key must name the data set (a non-empty file-name prefix without a path "
                             f"separator) when cache_dir is given, got {cache_key!r}")
        fingerprint = model_fingerprint(model)

    def features(batches, split: str):
        name = f"{split}_batches"
        cache = None if cache_dir is None else os.path.join(os.fspath(cache_dir), f"{cache_key}-{split}.pt")
        x, y = _extract(model, batches, name, device=device, autocast_dtype=autocast_dtype,
                        max_batches=max_batches, progress=progress, cache=cache, fingerprint=fingerprint)
        return x, _check_labels(name, y, x.shape[0], "image", "images")

    train_x, train_y = features(train_batches, "train")
    classes = torch.unique(train_y)
    if classes.numel() < 2:
        raise ValueError(f"train_batches must have at least 2 classes to fit a classifier, "
                         f"got {classes.tolist()}")
    if val_batches is not None:
        val_x, val_y = features(val_batches, "val")
    else:
        train_idx, val_idx = _stratified_split(train_y, val_fraction, seed)
        if val_idx.numel() == 0:
            raise ValueError(f"val_fraction={val_fraction} leaves no validation sample out of the "
                             f"{train_y.shape[0]} train samples ({classes.numel()} classes); pass "
                             f"val_batches or more data")
        val_x, val_y = train_x[val_idx], train_y[val_idx]
        train_x, train_y = train_x[train_idx], train_y[train_idx]
    test_x, test_y = features(test_batches, "test")
    for name, x in (("val", val_x), ("test", test_x)):
        if x.shape[1] != train_x.shape[1]:
            raise ValueError(f"{name}_batches' features must have the train features' dim "
                             f"{train_x.shape[1]}, got {tuple(x.shape)}")
    num_classes = 1 + int(max(train_y.max(), val_y.max(), test_y.max()))
    probe = fit_linear_probe(train_x, train_y, val_x, val_y, num_classes=num_classes)
    m = linear_probe_metrics(probe, test_x, test_y)
    out = {k: m[k] for k in ("top1", "top5") if k in m}
    out.update(mean_per_class_recall=m["mean_per_class_recall"], weight_decay=probe.weight_decay,
               n_train=probe.n_train, n_val=probe.n_val, n_test=test_x.shape[0], num_classes=num_classes)
    return out
