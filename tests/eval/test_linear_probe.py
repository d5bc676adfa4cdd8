"""fastclip.eval.linear_probe: the fit against closed forms, the weight-decay search, metrics with
known answers, the feature cache, the whole evaluation on a tiny model, refusals."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastclip.eval import (LinearProbe, evaluate_linear_probe, extract_features, fit_linear_probe,
                           linear_probe_metrics, model_fingerprint)
from fastclip.eval.common import encode_labelled_images, images_and_labels
from fastclip.eval.linear_probe import DEFAULT_WEIGHT_DECAYS, _stratified_split

F64 = torch.float64


def _objective_grad(probe, x, y, weight_decay):
    """max |gradient| of mean CE + weight_decay / 2 ||W||^2 at the probe's (finite) weights."""
    w = probe.weight.clone().requires_grad_(True)
    b = probe.bias.clone().requires_grad_(True)
    loss = F.cross_entropy(x.to(F64) @ w.t() + b, y) + 0.5 * weight_decay * w.pow(2).sum()
    loss.backward()
    return max(w.grad.abs().max().item(), b.grad.abs().max().item())


def _gaussians(n, mu0, mu1, chol, prior1, gen):
    y = (torch.rand(n, generator=gen) < prior1).long()
    x = torch.randn(n, mu0.shape[0], generator=gen, dtype=F64) @ chol.t()
    return x + torch.where(y[:, None] == 1, mu1, mu0), y


def _spurious(n, train, gen, d=10):
    """Dim 0: two overlapping classes (the real signal).  Dims 1..: a small cue that separates the
    train split perfectly and is pure noise in validation (what weak regularisation latches onto)."""
    y = torch.arange(n) % 2
    s = 2.0 * y - 1
    x = torch.empty(n, d, dtype=F64)
    x[:, 0] = s + torch.randn(n, generator=gen, dtype=F64)
    if train:
        x[:, 1:] = 0.1 * s[:, None] + 0.01 * torch.randn(n, d - 1, generator=gen, dtype=F64)
    else:
        x[:, 1:] = 0.3 * torch.randn(n, d - 1, generator=gen, dtype=F64)
    return x, y


def _clean(n, gen):
    y = torch.arange(n) % 2
    x = torch.randn(n, 2, generator=gen, dtype=F64)
    x[:, 0] += 4.0 * (2 * y - 1)
    return x, y


# ----------------------------------------------------------------------------------------------
# fit_linear_probe
# ----------------------------------------------------------------------------------------------
def test_fit_matches_lda_for_two_gaussians_with_a_shared_covariance():
    # Under this model the class posterior is exactly logistic with slope S^-1 (mu1 - mu0) and
    # intercept log(p1 / p0) - (mu1 + mu0)^T S^-1 (mu1 - mu0) / 2: with many samples and almost no
    # regularisation the fit must recover both.
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=gen, dtype=F64)
    cov = a @ a.t() / 4 + 0.5 * torch.eye(4, dtype=F64)
    chol = torch.linalg.cholesky(cov)
    mu0, mu1 = torch.zeros(4, dtype=F64), torch.tensor([1.0, -0.5, 0.3, 0.8], dtype=F64)
    prior1 = 0.3
    xt, yt = _gaussians(30000, mu0, mu1, chol, prior1, gen)
    xv, yv = _gaussians(10000, mu0, mu1, chol, prior1, gen)
    probe = fit_linear_probe(xt.float(), yt, xv.float(), yv, weight_decays=[1e-7])
    assert probe.weight.shape == (2, 4) and probe.bias.shape == (2,) and probe.weight.dtype == F64
    slope = probe.weight[1] - probe.weight[0]
    intercept = (probe.bias[1] - probe.bias[0]).item()
    lda_slope = torch.linalg.solve(cov, mu1 - mu0)
    lda_intercept = math.log(prior1 / (1 - prior1)) - 0.5 * ((mu1 + mu0) @ lda_slope).item()
    cos = F.cosine_similarity(slope, lda_slope, dim=0).item()
    assert cos > 0.99, f"fitted direction {slope.tolist()} vs LDA {lda_slope.tolist()}: cosine {cos}"
    # the decision boundary crosses the segment mu0 -> mu1 where LDA's does
    t_fit = -(intercept + (mu0 @ slope).item()) / ((mu1 - mu0) @ slope).item()
    t_lda = -(lda_intercept + (mu0 @ lda_slope).item()) / ((mu1 - mu0) @ lda_slope).item()
    assert abs(t_fit - t_lda) < 0.03, f"boundary at t={t_fit:.4f} along mu0->mu1, LDA puts it at {t_lda:.4f}"
    torch.testing.assert_close(slope, lda_slope, atol=0.05, rtol=0.05)
    # optimality (KKT): the regularised objective's gradient vanishes over the data of the final fit
    x_all, y_all = torch.cat([xt, xv]).float(), torch.cat([yt, yv])
    assert _objective_grad(probe, x_all, y_all, 1e-7) < 1e-5


def test_refit_uses_train_and_validation():
    gen = torch.Generator().manual_seed(1)
    xt, yt = _spurious(40, True, gen)
    xv, yv = _spurious(60, False, gen)
    probe = fit_linear_probe(xt, yt, xv, yv, weight_decays=[1e-2])
    assert probe.weight_decay == 1e-2 and (probe.n_train, probe.n_val) == (40, 60)
    assert _objective_grad(probe, torch.cat([xt, xv]), torch.cat([yt, yv]), 1e-2) < 1e-5
    assert _objective_grad(probe, xt, yt, 1e-2) > 1e-3, "the optimum of train + val, not of train alone"


def test_validation_picks_strong_regularisation_against_a_spurious_cue():
    gen = torch.Generator().manual_seed(2)
    grid = dict(weight_decays=[1e-4, 1e-2, 1.0, 1e2], refine_steps=1, max_iter=200)
    noisy = fit_linear_probe(*_spurious(40, True, gen), *_spurious(400, False, gen), **grid)
    clean = fit_linear_probe(*_clean(200, gen), *_clean(200, gen), **grid)
    assert noisy.search[1e-4] < max(noisy.search.values()) - 0.1, noisy.search  # weak decay overfits the cue
    assert noisy.weight_decay >= 0.1, noisy.search
    # clean: every value is perfect on validation; the tie goes to the lowest validation loss
    assert set(clean.search.values()) == {1.0} and clean.weight_decay == 1e-4, clean.search_loss
    assert noisy.weight_decay >= 100 * clean.weight_decay


def test_search_refines_by_bisection_in_log_space():
    gen = torch.Generator().manual_seed(2)
    probe = fit_linear_probe(*_spurious(40, True, gen), *_spurious(400, False, gen), max_iter=100)
    tried = sorted(probe.search)
    assert set(DEFAULT_WEIGHT_DECAYS) <= set(tried) and list(probe.search) == list(probe.search_loss)
    assert len(tried) <= len(DEFAULT_WEIGHT_DECAYS) + 2 * 3
    for wd in tried:  # grid values and bisection midpoints: multiples of 1/8 decade
        assert abs(8 * math.log10(wd) - round(8 * math.log10(wd))) < 1e-9, wd
    best = max(probe.search, key=lambda wd: (probe.search[wd], -probe.search_loss[wd], wd))
    assert probe.weight_decay == best
    i = tried.index(best)
    for j in (i - 1, i + 1):  # after 3 steps from one value per decade: 8 values per decade
        if 0 <= j < len(tried):
            assert math.isclose(abs(math.log10(tried[j] / best)), 1 / 8, rel_tol=1e-9)


def test_fit_is_deterministic_and_float32_agrees():
    gen = torch.Generator().manual_seed(3)
    data = (*_spurious(40, True, gen), *_spurious(100, False, gen))
    kw = dict(weight_decays=[1e-3, 1e-1, 10.0], refine_steps=1)
    a, b = fit_linear_probe(*data, **kw), fit_linear_probe(*data, **kw)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and a.search == b.search
    c = fit_linear_probe(*data, **kw, dtype=torch.float32)
    assert c.weight.dtype == torch.float32 and c.weight_decay == a.weight_decay
    torch.testing.assert_close(c.weight.double(), a.weight, atol=1e-3, rtol=1e-3)


def test_classes_missing_from_training_are_never_predicted():
    gen = torch.Generator().manual_seed(4)
    centres = torch.eye(3, dtype=F64) * 4
    y = torch.arange(60) % 3
    x = centres[y] + torch.randn(60, 3, generator=gen, dtype=F64)
    probe = fit_linear_probe(x[:45], y[:45], x[45:], y[45:], num_classes=6, weight_decays=[1e-2])
    assert probe.num_classes == 6 and probe.bias[3:].eq(-math.inf).all() and probe.weight[3:].eq(0).all()
    assert probe.predict(x).lt(3).all()
    # a test set with class 4 (never trained): those samples are misses at every k < C (here 6; at
    # k = C every sample is a hit), the rest is scored as usual
    x_test = torch.cat([x[:6], x[:2]])
    y_test = torch.cat([y[:6], torch.tensor([4, 4])])
    m = linear_probe_metrics(probe, x_test, y_test)
    assert m["top1"] == pytest.approx(6 / 8) and m["top5"] == pytest.approx(6 / 8)
    assert m["mean_per_class_recall"] == pytest.approx((1 + 1 + 1 + 0) / 4)
    # a class first seen in the validation split is fitted by the refit on train + val
    probe = fit_linear_probe(x[:45][y[:45] < 2], y[:45][y[:45] < 2], x[45:], y[45:], weight_decays=[1e-2])
    assert torch.isfinite(probe.bias).all() and probe.search[1e-2] < 1.0


# ----------------------------------------------------------------------------------------------
# linear_probe_metrics
# ----------------------------------------------------------------------------------------------
def _identity_probe(c, bias=None):
    return LinearProbe(torch.eye(c, dtype=F64), torch.zeros(c, dtype=F64) if bias is None else bias, 0.0)


def test_metrics_by_hand_ties_count_against_the_true_class():
    probe = _identity_probe(3)  # logits = x
    x = torch.tensor([[3.0, 1.0, 0.0],    # class 0: hit
                      [1.0, 1.0, 0.0],    # class 0: tied with class 1 -> miss
                      [0.0, 2.0, 1.0],    # class 1: hit
                      [0.0, 0.0, 5.0],    # class 1: miss
                      [2.0, 2.0, 2.0]])   # class 2: all tied -> miss
    y = torch.tensor([0, 0, 1, 1, 2])
    m = linear_probe_metrics(probe, x, y)
    assert "top5" not in m, "top5 needs at least 5 classes"
    assert m["top1"] == pytest.approx(2 / 5)
    assert m["mean_per_class_recall"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert m["num_samples"] == 5 and m["num_classes"] == 3


def test_metrics_top5_and_the_bias():
    probe = _identity_probe(6, bias=torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 10.0], dtype=F64))
    x = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, -9.5],   # logits 6 5 4 3 2 0.5: class 4 5th -> top5 hit
                      [6.0, 5.0, 4.0, 3.0, 2.0, -8.0],   # class 5's logit 2 ties class 4 -> class 4 6th
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],    # class 5 wins through the bias alone
                      [1.0, 0.0, 0.0, 0.0, 0.0, -10.0]])  # class 0: hit; class 5's logit 0 ties 1..4
    y = torch.tensor([4, 4, 5, 0])
    m = linear_probe_metrics(probe, x, y)
    assert m["top1"] == pytest.approx(2 / 4) and m["top5"] == pytest.approx(3 / 4)
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0 + 1) / 3)  # classes 0, 4, 5 present
    assert probe.predict(x).tolist() == [0, 0, 5, 0]


# ----------------------------------------------------------------------------------------------
# extract_features and the cache
# ----------------------------------------------------------------------------------------------
class CountingModel(nn.Module):
    """encode_image = a linear map of the flattened image; counts its calls."""

    def __init__(self, d_in=12, d=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(d_in, d)
        self.dropout = nn.Dropout(0.5)  # must be off: extraction runs in eval mode
        self.calls = 0

    def encode_image(self, images, normalize=False):
        self.calls += 1
        f = self.dropout(self.proj(images.flatten(1)))
        return F.normalize(f, dim=-1) if normalize else f


def _toy_batches(n=20, bs=6, seed=0, classes=3, extra=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 2, 2, generator=g)
    y = torch.arange(n) % classes
    if extra:  # (images, tokens, labels, meta) as ClipLoader(with_labels=True, return_meta=True)
        return [(x[i:i + bs], torch.zeros(len(y[i:i + bs]), 7, dtype=torch.long), y[i:i + bs], {"k": i})
                for i in range(0, n, bs)]
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def test_extract_features_layout_and_eval_mode():
    model = CountingModel().train()
    feats, labels = extract_features(model, _toy_batches(extra=True))
    assert feats.shape == (20, 5) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert labels.dtype == torch.int64 and labels.tolist() == [i % 3 for i in range(20)]
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(20))
    x = torch.cat([b[0] for b in _toy_batches()])
    with torch.no_grad():
        torch.testing.assert_close(feats, F.normalize(model.proj(x.flatten(1)), dim=-1))  # no dropout
    assert model.training and model.dropout.training, "training flags restored"
    assert model.calls == 4
    feats2, _ = extract_features(model, _toy_batches(), max_batches=2)
    assert feats2.shape == (12, 5)


def test_cache_second_run_loads(tmp_path):
    model, path = CountingModel(), str(tmp_path / "sub" / "feats.pt")
    first = extract_features(model, _toy_batches(), cache=path)
    assert model.calls == 4 and os.path.exists(path)
    second = extract_features(model, _toy_batches(), cache=path)
    assert model.calls == 4, "the second run must load the cache, not run the model"
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert os.listdir(tmp_path / "sub") == ["feats.pt"], "no temporary file left behind"
    # other settings are another cache: recomputed (and the file replaced)
    extract_features(model, _toy_batches(), cache=path, max_batches=2)
    assert model.calls == 6
    extract_features(model, _toy_batches(), cache=path, max_batches=2)
    assert model.calls == 6


def test_cache_is_recomputed_for_a_changed_model(tmp_path):
    model, path = CountingModel(), str(tmp_path / "feats.pt")
    before, _ = extract_features(model, _toy_batches(), cache=path)
    with torch.no_grad():
        model.proj.weight[0, 0] += 0.5
    after, _ = extract_features(model, _toy_batches(), cache=path)
    assert model.calls == 8 and not torch.allclose(before, after)
    other = CountingModel(seed=1)
    extract_features(other, _toy_batches(), cache=path)
    assert other.calls == 4
    # an explicit fingerprint is the caller's word: a model change under the same one is not seen
    extract_features(model, _toy_batches(), cache=path, fingerprint="ckpt-1")
    extract_features(other, _toy_batches(), cache=path, fingerprint="ckpt-1")
    assert model.calls == 12 and other.calls == 4


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign", "flip"])
def test_cache_damaged_or_foreign_is_recomputed(tmp_path, damage):
    model, path = CountingModel(), str(tmp_path / "feats.pt")
    good, labels = extract_features(model, _toy_batches(), cache=path)
    if damage == "truncate":
        data = (tmp_path / "feats.pt").read_bytes()
        (tmp_path / "feats.pt").write_bytes(data[:len(data) // 2])
    elif damage == "garbage":
        (tmp_path / "feats.pt").write_bytes(b"not a torch file")
    elif damage == "foreign":
        torch.save({"features": torch.zeros(20, 5), "labels": torch.zeros(20, dtype=torch.long)}, path)
    else:  # a valid file whose features no longer match its checksum
        payload = torch.load(path, weights_only=True)
        payload["features"][0, 0] += 1
        torch.save(payload, path)
    with pytest.warns(UserWarning, match="feature cache|not a fastclip feature cache"):
        again, labels2 = extract_features(model, _toy_batches(), cache=path)
    assert model.calls == 8 and torch.equal(again, good) and torch.equal(labels2, labels)
    extract_features(model, _toy_batches(), cache=path)
    assert model.calls == 8, "the recomputed file is a good cache"


def test_model_fingerprint():
    a, b = CountingModel(seed=0), CountingModel(seed=0)
    assert model_fingerprint(a) == model_fingerprint(b) and len(model_fingerprint(a)) == 64
    with torch.no_grad():
        b.proj.bias[2] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(CountingModel(seed=0).double())
    big = nn.Module()  # past 2**24 entries, where float32 index arithmetic would overrun the end
    big.register_buffer("table", torch.arange(2**24 + 3, dtype=torch.int32))
    fp = model_fingerprint(big)
    big.table[-1] = 0
    assert model_fingerprint(big) != fp
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        model_fingerprint("ViT-B-32")


def test_common_batch_helpers():
    images = torch.zeros(2, 3, 4, 4)
    labels = torch.tensor([1, 0])
    got = images_and_labels((images, torch.zeros(2, 7, dtype=torch.long), labels, {"m": 1}), 0)
    assert got[0] is images and got[1] is labels
    with pytest.raises(ValueError, match=r"^train_batches: batch 3 has no labels"):
        images_and_labels((images, torch.zeros(2, 7, dtype=torch.long)), 3, "train_batches")
    with pytest.raises(ValueError, match=r"^test_batches: the evaluation set is empty"):
        encode_labelled_images(CountingModel(), [], name="test_batches")
    started = []
    f, y = encode_labelled_images(CountingModel(), _toy_batches(), on_start=lambda: started.append(1))
    assert started == [1] and f.shape == (20, 5) and y.dtype == torch.int64


# ----------------------------------------------------------------------------------------------
# evaluate_linear_probe
# ----------------------------------------------------------------------------------------------
def _pattern_batches(base, per_class, gen, bs=8):
    y = torch.arange(base.shape[0]).repeat(per_class)
    x = base[y] + 0.1 * torch.randn(len(y), *base.shape[1:], generator=gen)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(y), bs)]


def test_evaluate_on_a_tiny_model(model, tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(5, 3, 32, 32, generator=gen)  # 5 classes, one pattern each
    train, test = _pattern_batches(base, 10, gen), _pattern_batches(base, 4, gen)
    calls = []
    hook = model.visual.register_forward_pre_hook(lambda m, args: calls.append(m.training))
    try:
        out = evaluate_linear_probe(model, train, test, cache_dir=str(tmp_path), cache_key="patterns")
        n_calls = len(calls)
        again = evaluate_linear_probe(model, train, test, cache_dir=str(tmp_path), cache_key="patterns")
    finally:
        hook.remove()
    assert list(out) == ["top1", "top5", "mean_per_class_recall", "weight_decay", "n_train", "n_val",
                         "n_test", "num_classes"]
    assert (out["n_train"], out["n_val"], out["n_test"], out["num_classes"]) == (40, 10, 20, 5)
    assert out["top1"] >= 0.9 and out["top5"] == 1.0 and out["mean_per_class_recall"] >= 0.9
    assert min(DEFAULT_WEIGHT_DECAYS) <= out["weight_decay"] <= max(DEFAULT_WEIGHT_DECAYS)
    assert n_calls == len(train) + len(test) and not any(calls), "eval mode, each batch once"
    assert len(calls) == n_calls, "the second run reads the cache"
    assert again == out
    assert sorted(os.listdir(tmp_path)) == ["patterns-test.pt", "patterns-train.pt"]


def test_evaluate_with_a_validation_set_and_few_classes():
    model = CountingModel(d_in=12, d=6)
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(3, 3, 2, 2, generator=gen)
    train, val, test = (_pattern_batches(base, k, gen, bs=5) for k in (6, 4, 3))
    out = evaluate_linear_probe(model, train, test, val_batches=val)
    assert "top5" not in out and out["num_classes"] == 3
    assert (out["n_train"], out["n_val"], out["n_test"]) == (18, 12, 9) and out["top1"] == 1.0
    # a test class the train set never saw: its samples are misses, it still counts as a class
    test_extra = test + [(base[:1].repeat(2, 1, 1, 1), torch.tensor([3, 3]))]
    out = evaluate_linear_probe(model, train, test_extra, val_batches=val)
    assert out["num_classes"] == 4 and out["n_test"] == 11 and out["top1"] == pytest.approx(9 / 11)
    assert out["mean_per_class_recall"] == pytest.approx(3 / 4)


def test_stratified_split():
    y = torch.tensor([0] * 10 + [1] * 5 + [2] * 1 + [3] * 2)
    tr, va = _stratified_split(y, 0.2, seed=0)
    assert torch.bincount(y[va], minlength=4).tolist() == [2, 1, 0, 0]  # round(0.2 n_c), one stays in train
    assert sorted(tr.tolist() + va.tolist()) == list(range(18)) and torch.equal(tr, tr.sort().values)
    assert torch.equal(_stratified_split(y, 0.2, seed=0)[1], va)
    assert not torch.equal(_stratified_split(y, 0.2, seed=1)[1], va)
    _, va = _stratified_split(y, 0.99, seed=0)
    assert torch.bincount(y[va], minlength=4).tolist() == [9, 4, 0, 1]


# ----------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------
class Untouchable:
    """Batches that must not be read: argument checks come first."""

    def __iter__(self):
        raise AssertionError("batches were read before the arguments were checked")


@pytest.mark.parametrize("kw, match", [
    (dict(val_fraction=0.0), r"^val_fraction must be a number in \(0, 1\), got 0.0"),
    (dict(val_fraction=1), r"^val_fraction must be a number in \(0, 1\), got 1"),
    (dict(val_fraction=-0.5), r"^val_fraction"),
    (dict(val_fraction=True), r"^val_fraction"),
    (dict(cache_dir="x"), r"^cache_key must name the data set"),
    (dict(cache_dir="x", cache_key="a/b"), r"^cache_key"),
    (dict(max_batches=0), r"^max_batches must be a positive int"),
    (dict(autocast_dtype=torch.float32), r"^autocast_dtype"),
    (dict(seed=1.5), r"^seed must be an int"),
])
def test_evaluate_refuses_bad_arguments_before_reading(kw, match):
    with pytest.raises(ValueError, match=match):
        evaluate_linear_probe(CountingModel(), Untouchable(), Untouchable(), **kw)


def _labelled(labels, n_feat=12):
    labels = torch.tensor(labels, dtype=torch.long)
    return [(torch.randn(len(labels), n_feat), labels)]


@pytest.mark.parametrize("train, test, match", [
    ([-1] * 6, [0, 1], r"^train_batches: a set without labels: 6 of the 6 labels are -1"),
    ([0, 1, 0, 1, -1], [0, 1], r"^train_batches: a set without labels: 1 of the 5"),
    ([0, 1, 0, -2], [0, 1], r"^train_batches must be non-negative class indices, got \[-2\]"),
    ([1, 1, 1, 1], [0, 1], r"^train_batches must have at least 2 classes .* got \[1\]"),
    ([], [0, 1], r"^train_batches: the evaluation set is empty"),
    ([0, 1] * 5, [], r"^test_batches: the evaluation set is empty"),
    ([0, 1] * 5, [-1, -1], r"^test_batches: a set without labels"),
    ([0, 1, 2], [0, 1], r"^val_fraction=0.2 leaves no validation sample"),
])
def test_evaluate_refuses_bad_sets(train, test, match):
    test_model = CountingModel()
    with pytest.raises(ValueError, match=match):
        evaluate_linear_probe(test_model, _labelled(train), _labelled(test))
    if "train_batches" in match:  # refused before the test set is read
        assert test_model.calls <= 1


def test_evaluate_refuses_an_unlabelled_batch():
    images = torch.randn(4, 12)
    with pytest.raises(ValueError, match=r"^train_batches: batch 0 has no labels"):
        evaluate_linear_probe(CountingModel(), [(images, torch.zeros(4, 7, dtype=torch.long).float())],
                              Untouchable())


def _xy(n=6, d=3, classes=2):
    return torch.randn(n, d), torch.arange(n) % classes


@pytest.mark.parametrize("args, kw, exc, match", [
    ((*_xy(), torch.randn(4, 5), _xy(4)[1]), {}, ValueError,
     r"^train_x and val_x must have the same feature dim, got \(6, 3\) and \(4, 5\)"),
    ((torch.randn(0, 3), torch.zeros(0, dtype=torch.long), *_xy()), {}, ValueError, r"^train_x is empty"),
    ((*_xy(), torch.randn(0, 3), torch.zeros(0, dtype=torch.long)), {}, ValueError, r"^val_x is empty"),
    ((*_xy(), *_xy()), dict(num_classes=1), ValueError,
     r"^train_y must be class indices in \[0, 1\), got \[1, 1, 1\]"),
    ((_xy()[0], torch.tensor([0, 1, 2, 0, 1, 5]), *_xy()), dict(num_classes=3), ValueError,
     r"^train_y must be class indices in \[0, 3\), got \[5\]"),
    ((_xy()[0], torch.full((6,), -1), *_xy()), {}, ValueError, r"^train_y: a set without labels"),
    ((_xy()[0], torch.zeros(6, dtype=torch.long), *_xy()), {}, ValueError,
     r"^train_y must have at least 2 classes"),
    ((_xy()[0], torch.zeros(5, dtype=torch.long), *_xy()), {}, ValueError,
     r"^train_y must have one entry per row"),
    ((_xy()[0], torch.zeros(6), *_xy()), {}, ValueError, r"^train_y must be an integer tensor"),
    ((torch.arange(6), _xy()[1], *_xy()), {}, ValueError, r"^train_x must be a floating-point tensor"),
    ((torch.full((6, 3), math.nan), _xy()[1], *_xy()), {}, ValueError, r"^train_x contains NaN"),
    ((*_xy(), *_xy()), dict(weight_decays=[0.0]), ValueError, r"^weight_decays must be positive finite"),
    ((*_xy(), *_xy()), dict(weight_decays=[]), ValueError, r"^weight_decays"),
    ((*_xy(), *_xy()), dict(refine_steps=-1), ValueError, r"^refine_steps must be a non-negative int"),
    ((*_xy(), *_xy()), dict(max_iter=0), ValueError, r"^max_iter must be a positive int"),
    ((*_xy(), *_xy()), dict(dtype=torch.float16), ValueError,
     r"^dtype must be torch.float64 or torch.float32"),
    (([[1.0]], *_xy()[1:], *_xy()), {}, TypeError, r"^train_x must be a torch.Tensor"),
])
def test_fit_refuses_bad_input(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        fit_linear_probe(*args, **kw)


def test_metrics_refuse_bad_input():
    probe = _identity_probe(3)
    with pytest.raises(ValueError, match=r"^x must have the probe's feature dim 3, got \(2, 4\)"):
        linear_probe_metrics(probe, torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^y must be class indices in \[0, 3\), got \[3\]"):
        linear_probe_metrics(probe, torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"^y: a set without labels"):
        linear_probe_metrics(probe, torch.randn(2, 3), torch.tensor([-1, -1]))
    with pytest.raises(ValueError, match=r"^x is empty"):
        linear_probe_metrics(probe, torch.randn(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(TypeError, match=r"^probe must be a LinearProbe"):
        linear_probe_metrics(torch.eye(3), torch.randn(2, 3), torch.tensor([0, 1]))
