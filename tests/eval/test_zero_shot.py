"""fastclip.eval.zero_shot: the classifier by hand, metrics with known answers, the loop, refusals."""
import pytest
import torch
import torch.nn.functional as F

import fastclip
from fastclip.data import CLASSNAMES, TEMPLATES, ClipLoader, make_shapes_dataset
from fastclip.eval import evaluate_zero_shot, zero_shot_classifier, zero_shot_metrics


@pytest.fixture(scope="module")
def tokenizer():
    return fastclip.get_tokenizer()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(str(tmp_path_factory.mktemp("shapes")), num_samples=64, image_size=32,
                               max_objects=1)


def _loader(meta, **kw):
    kw = {"with_labels": True, **kw}
    return ClipLoader(meta["shards_path"], batch_size=16, image_size=32, train=False, backend="pil", **kw)


def _flags(model):
    return [m.training for m in model.modules()]


def _one_hot_scores(rows):
    """Features whose logits against eye(C) rank classes as ``rows`` (any positive scale)."""
    return torch.tensor(rows, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# zero_shot_classifier
# ----------------------------------------------------------------------------------------------
def test_classifier_matches_a_hand_computation(model, tokenizer):
    classnames = ["red circle", "blue square", "green triangle"]
    templates = ["a {}.", lambda c: f"a drawing of a {c}, small."]
    got = zero_shot_classifier(model, classnames, templates, tokenizer, batch_size=4)  # batches cross classes
    assert got.shape == (32, 3) and got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got.norm(dim=0), torch.ones(3))
    with torch.no_grad():
        for c, name in enumerate(classnames):
            tokens = tokenizer([f"a {name}.", f"a drawing of a {name}, small."])
            per_template = model.encode_text(tokens, normalize=True)
            expected = F.normalize(per_template.mean(0), dim=0)
            torch.testing.assert_close(got[:, c], expected, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"class {c} ({name}): {m}")
    for bs in (1, 256):
        again = zero_shot_classifier(model, classnames, templates, tokenizer, batch_size=bs)
        torch.testing.assert_close(again, got, atol=1e-5, rtol=1e-5)
    # default tokenizer: CLIP's at the model's context length
    torch.testing.assert_close(zero_shot_classifier(model, classnames, templates), got, atol=0, rtol=0)


def test_classifier_restores_every_training_flag(model, tokenizer):
    model.train()
    model.visual.eval()  # a mixed state (a frozen tower), not just the top-level flag
    before = _flags(model)
    assert any(before) and not all(before)
    seen = []
    hook = model.transformer.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    try:
        zero_shot_classifier(model, ["a", "b"], ["{}"], tokenizer)
        after = _flags(model)
    finally:
        hook.remove()
        model.eval()
    assert seen and not any(seen), "the text tower must run in eval mode"
    assert after == before


@pytest.mark.parametrize("classnames, templates, exc, match", [
    ("red circle", ["{}"], TypeError, "classnames"),
    ([], ["{}"], ValueError, "classnames"),
    (["a"], [], ValueError, "templates"),
    (["a"], ["no placeholder"], ValueError, r"templates\[0\].*placeholder"),
    (["a"], ["{}", 3], TypeError, r"templates\[1\]"),
    (["a"], [lambda c: 3], TypeError, r"templates\[0\].*return a str"),
    (["a", 2], ["{}"], TypeError, r"classnames\[1\]"),
])
def test_classifier_refuses_bad_names(model, tokenizer, classnames, templates, exc, match):
    with pytest.raises(exc, match=match):
        zero_shot_classifier(model, classnames, templates, tokenizer)


# ----------------------------------------------------------------------------------------------
# zero_shot_metrics
# ----------------------------------------------------------------------------------------------
def test_metrics_perfect_and_all_wrong():
    c = 10
    labels = torch.arange(20) % c
    perfect = zero_shot_metrics(F.one_hot(labels, c).float() * 3.0, labels, torch.eye(c))
    assert perfect == {"top1": 1.0, "top5": 1.0, "mean_per_class_recall": 1.0, "num_samples": 20,
                       "num_classes": 10}
    # the true class scores lowest of all: wrong at every k < C
    wrong = zero_shot_metrics(1.0 - 2.0 * F.one_hot(labels, c).float(), labels, torch.eye(c))
    assert wrong["top1"] == 0.0 and wrong["top5"] == 0.0 and wrong["mean_per_class_recall"] == 0.0
    assert zero_shot_metrics(1.0 - 2.0 * F.one_hot(labels, c).float(), labels, torch.eye(c),
                             ks=(9, 10))["top10"] == 1.0


def test_metrics_known_partial():
    # 6 classes; the true class (label = row index) is ranked 0, 1, 3 and 5 (0 = best)
    rows = [[6, 5, 4, 3, 2, 1],   # label 0: rank 0
            [6, 5, 4, 3, 2, 1],   # label 1: rank 1
            [6, 5, 3, 4, 2, 1],   # label 2: rank 3
            [1, 6, 5, 0.5, 3, 2]]  # label 3: rank 5
    labels = torch.tensor([0, 1, 2, 3])
    m = zero_shot_metrics(_one_hot_scores(rows), labels, torch.eye(6), ks=(1, 2, 4, 5, 6))
    assert m["top1"] == 0.25 and m["top2"] == 0.5 and m["top4"] == 0.75 and m["top5"] == 0.75
    assert m["top6"] == 1.0 and m["mean_per_class_recall"] == 0.25
    assert m["num_samples"] == 4 and m["num_classes"] == 6


def test_metrics_ks_above_the_class_count_are_left_out():
    labels = torch.tensor([0, 1, 2, 3])
    m = zero_shot_metrics(torch.randn(4, 8), labels, F.normalize(torch.randn(8, 4), dim=0))
    assert "top1" in m and "top5" not in m and m["num_classes"] == 4
    m = zero_shot_metrics(torch.randn(4, 8), labels, F.normalize(torch.randn(8, 4), dim=0), ks=(1, 3, 4, 10))
    assert {"top1", "top3", "top4"} <= m.keys() and "top10" not in m and m["top4"] == 1.0


def test_mean_per_class_recall_differs_from_top1_when_unbalanced():
    c = 3
    labels = torch.tensor([0] * 8 + [1] * 2)
    predicted = torch.tensor([0] * 8 + [2] * 2)  # the big class right, the small one wrong
    m = zero_shot_metrics(F.one_hot(predicted, c).float(), labels, torch.eye(c), ks=(1,))
    assert m["top1"] == pytest.approx(0.8)
    assert m["mean_per_class_recall"] == pytest.approx(0.5)  # class 2 is absent: not averaged in


def test_metrics_ties_count_against_the_true_class():
    # the true class (1) ties with one other class: one wrong class >= it -> a miss at 1, a hit at 2
    feats = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    labels = torch.tensor([1, 1])
    m = zero_shot_metrics(feats, labels, torch.eye(3), ks=(1, 2))
    assert m["top1"] == 0.0 and m["top2"] == 1.0 and m["mean_per_class_recall"] == 0.0
    # tied with one class and under another: two wrong classes >= it -> a hit only from k = 3
    m = zero_shot_metrics(torch.tensor([[2.0, 1.0, 1.0, 0.0]]), torch.tensor([2]), torch.eye(4), ks=(1, 2, 3))
    assert (m["top1"], m["top2"], m["top3"]) == (0.0, 0.0, 1.0)
    # a tie between two wrong classes below the true one costs nothing
    m = zero_shot_metrics(torch.tensor([[1.0, 2.0, 1.0]]), torch.tensor([1]), torch.eye(3), ks=(1,))
    assert m["top1"] == 1.0 and m["mean_per_class_recall"] == 1.0


@pytest.mark.parametrize("num_classes", [1, 4, 7])
def test_metrics_collapsed_model_scores_nothing(num_classes):
    # every feature and every class weight equal: all C logits tie.  With C - 1 wrong classes >=
    # the true one, a sample is a hit at k iff C - 1 < k (only k = C for a C-way task).  D = 16 so
    # that the normalised features (1/4) and every logit (16 terms of 1/4 * 1/4) are exact in any
    # summation order: with D = 8 (1/sqrt(8)) BLAS may round columns differently and break the tie.
    c = num_classes
    labels = torch.arange(12) % c
    m = zero_shot_metrics(torch.ones(12, 16), labels, torch.full((16, c), 0.25), ks=range(1, c + 1))
    for k in range(1, c + 1):
        assert m[f"top{k}"] == (1.0 if c - 1 < k else 0.0), (k, m)
    assert m["mean_per_class_recall"] == (1.0 if c == 1 else 0.0)


def _brute_force_top(logits, labels, k, optimistic=False):
    """The pessimistic rule by explicit counting: other classes with a logit >= the true one
    (``optimistic``: the old rule, only classes strictly above the true one count)."""
    hits = 0
    for row, y in zip(logits.tolist(), labels.tolist()):
        wrong = sum(1 for c, v in enumerate(row) if c != y and (v > row[y] if optimistic else v >= row[y]))
        hits += wrong < k
    return hits / len(labels)


def test_metrics_order_independence():
    # permuting the classes (columns and labels together) changes nothing
    torch.manual_seed(0)
    feats, cls = torch.randn(50, 16), F.normalize(torch.randn(16, 7), dim=0)
    labels = torch.randint(0, 7, (50,))
    perm = torch.randperm(7)
    inv = torch.argsort(perm)
    assert zero_shot_metrics(feats, labels, cls) == zero_shot_metrics(feats, inv[labels], cls[:, perm])


def test_metrics_order_independence_with_many_exact_ties():
    # Each class weight is an axis (two classes share one), features are small integers: every
    # logit is one feature coordinate / the row norm, exactly, so ties are exact and plentiful.
    g = torch.Generator().manual_seed(0)
    axes = torch.tensor([0, 1, 2, 1, 3, 0, 4])
    cls = torch.eye(5, dtype=torch.float64)[:, axes]  # [5, 7]
    feats = torch.randint(0, 3, (60, 5), generator=g).double()
    feats[feats.sum(1) == 0, 0] = 1.0  # no zero rows (normalize would leave them at 0 anyway)
    labels = torch.randint(0, 7, (60,), generator=g)
    ks = (1, 2, 3, 5, 7)
    base = zero_shot_metrics(feats, labels, cls, ks=ks)
    logits = feats @ cls  # same ranks as the normalised logits
    for k in ks:
        assert base[f"top{k}"] == pytest.approx(_brute_force_top(logits, labels, k))
        if k < 7:  # the ties are real: the old, optimistic rule would score higher at every k < C
            assert base[f"top{k}"] < _brute_force_top(logits, labels, k, optimistic=True)
    assert 0.0 < base["top1"] < base["top7"] == 1.0
    for seed in range(3):
        perm = torch.randperm(7, generator=torch.Generator().manual_seed(seed))
        inv = torch.argsort(perm)
        assert zero_shot_metrics(feats, inv[labels], cls[:, perm], ks=ks) == base
        rows = torch.randperm(60, generator=torch.Generator().manual_seed(seed))
        assert zero_shot_metrics(feats[rows], labels[rows], cls, ks=ks) == base


def test_metrics_agree_with_argmax_and_topk():
    torch.manual_seed(1)
    feats, cls = torch.randn(200, 16), F.normalize(torch.randn(16, 12), dim=0)
    labels = torch.randint(0, 12, (200,))
    logits = F.normalize(feats, dim=-1) @ cls
    m = zero_shot_metrics(feats, labels, cls)
    assert m["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    top5 = logits.topk(5, dim=1).indices
    assert m["top5"] == pytest.approx((top5 == labels[:, None]).any(1).float().mean().item())


@pytest.mark.parametrize("labels, match", [
    (torch.full((4,), -1), "labels: evaluation set without labels: 4 of the 4"),
    (torch.tensor([0, -1, 1, 2]), "labels: evaluation set without labels: 1 of the 4"),
    (torch.tensor([0, 1, 2, 7]), r"labels must be in \[0, 4\)"),
    (torch.tensor([0, 1, 2]), "labels must have one entry per image"),
    (torch.tensor([0.0, 1.0, 2.0, 3.0]), "labels must be an integer tensor"),
])
def test_metrics_refuse_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        zero_shot_metrics(torch.randn(4, 8), labels, torch.randn(8, 4))


def test_metrics_refuse_bad_features():
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"classifier must be \[D, C\] with D = image_features' dim 8"):
        zero_shot_metrics(torch.randn(2, 8), labels, torch.randn(6, 4))
    with pytest.raises(ValueError, match="image_features must be a floating-point tensor"):
        zero_shot_metrics(torch.randn(8), labels, torch.randn(8, 4))
    with pytest.raises(ValueError, match="image_features contains NaN"):
        zero_shot_metrics(torch.full((2, 8), float("nan")), labels, torch.randn(8, 4))
    with pytest.raises(ValueError, match="image_features is empty"):
        zero_shot_metrics(torch.randn(0, 8), labels[:0], torch.randn(8, 4))
    with pytest.raises(ValueError, match="ks must be positive ints"):
        zero_shot_metrics(torch.randn(2, 8), labels, torch.randn(8, 4), ks=(0,))


# ----------------------------------------------------------------------------------------------
# evaluate_zero_shot
# ----------------------------------------------------------------------------------------------
def _by_hand(model, batches, classifier):
    feats, labels = [], []
    with torch.no_grad():
        for images, _tokens, y in batches:
            feats.append(model.encode_image(images, normalize=True))
            labels.append(y)
    return zero_shot_metrics(torch.cat(feats), torch.cat(labels), classifier)


def test_evaluate_end_to_end_on_the_built_in_dataset(model, tokenizer, shapes):
    model.train()
    before = _flags(model)
    got = evaluate_zero_shot(model, _loader(shapes), CLASSNAMES, TEMPLATES, tokenizer, progress=True)
    assert _flags(model) == before
    model.eval()
    assert got["num_samples"] == 64 and got["num_classes"] == len(CLASSNAMES)
    for key in ("top1", "top5", "mean_per_class_recall"):
        assert 0.0 <= got[key] <= 1.0
    classifier = zero_shot_classifier(model, CLASSNAMES, TEMPLATES, tokenizer)
    expected = _by_hand(model, list(_loader(shapes)), classifier)
    assert got == pytest.approx(expected, abs=1e-12)
    # a precomputed classifier, (images, labels) pairs and max_batches
    pairs = [(images, labels) for images, _tokens, labels in _loader(shapes)]
    part = evaluate_zero_shot(model, pairs, CLASSNAMES, TEMPLATES, classifier=classifier, max_batches=2)
    assert part == pytest.approx(_by_hand(model, [(i, None, y) for i, y in pairs[:2]], classifier), abs=1e-12)
    assert part["num_samples"] == 32


def test_evaluate_reads_no_batch_beyond_max_batches(model, tokenizer):
    pulled, closed = [], []

    def batches():
        try:
            for i in range(10):
                pulled.append(i)
                yield torch.randn(2, 3, 32, 32), torch.tensor([i % 3, (i + 1) % 3])
        finally:
            closed.append(True)

    gen = batches()
    m = evaluate_zero_shot(model, gen, CLASSNAMES[:3], TEMPLATES[:1], tokenizer, max_batches=3)
    assert m["num_samples"] == 6 and pulled == [0, 1, 2] and closed == [True]


def test_evaluate_under_autocast(model, tokenizer, shapes):
    m = evaluate_zero_shot(model, _loader(shapes), CLASSNAMES, TEMPLATES, tokenizer,
                           autocast_dtype=torch.bfloat16, max_batches=1)
    assert m["num_samples"] == 16 and 0.0 <= m["top1"] <= 1.0


def test_evaluate_refusals(model, tokenizer, shapes):
    images = torch.randn(4, 3, 32, 32)
    args = (CLASSNAMES[:4], TEMPLATES[:1], tokenizer)
    with pytest.raises(ValueError, match="batch 0 has no labels.*with_labels=True"):
        evaluate_zero_shot(model, _loader(shapes, with_labels=False), *args)
    with pytest.raises(ValueError, match="labels: evaluation set without labels: all 8 labels are -1"):
        evaluate_zero_shot(model, [(images, torch.full((4,), -1))] * 2, *args)
    with pytest.raises(ValueError, match="batches: the evaluation set is empty"):
        evaluate_zero_shot(model, [], *args)
    with pytest.raises(ValueError, match="batches must yield tuples"):
        evaluate_zero_shot(model, [images], *args)
    with pytest.raises(ValueError, match="batch 0: 3 labels for 4 images"):
        evaluate_zero_shot(model, [(images, torch.tensor([0, 1, 2]))], *args)
    with pytest.raises(ValueError, match="max_batches must be None or a positive int"):
        evaluate_zero_shot(model, [(images, torch.zeros(4, dtype=torch.long))], *args, max_batches=0)
    with pytest.raises(ValueError, match="autocast_dtype must be"):
        evaluate_zero_shot(model, [], *args, autocast_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"classifier must be \[D, C\] with C = len\(classnames\) = 4"):
        evaluate_zero_shot(model, [], *args, classifier=torch.randn(32, 5))
