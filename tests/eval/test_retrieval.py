"""fastclip.eval.retrieval: recall (chunked vs the full matrix), the tie rule, memory, the loop, refusals.

Ties count against the correct item; no Ni x Nt matrix is allocated; the loop runs end to end on
the built-in dataset.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fastclip.data import ClipLoader, make_shapes_dataset
from fastclip.eval import evaluate_retrieval, retrieval_metrics, retrieval_metrics_reference

KS = (1, 2, 3, 5, 10)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(str(tmp_path_factory.mktemp("shapes")), num_samples=64, image_size=32,
                               max_objects=1)


def _loader(meta, **kw):
    return ClipLoader(meta["shards_path"], batch_size=16, image_size=32, train=False, with_labels=True,
                      backend="pil", **kw)


def _random_set(seed, ni, dim, dtype):
    """Features with 1 to 3 captions per image, captions in shuffled order; the captions are
    noisy copies of their image so that recalls are neither 0 nor 1."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 4, (ni,), generator=g)
    t2i = torch.repeat_interleave(torch.arange(ni), counts)
    t2i = t2i[torch.randperm(t2i.numel(), generator=g)]
    images = torch.randn(ni, dim, generator=g, dtype=torch.float64)
    texts = images[t2i] + 1.5 * torch.randn(t2i.numel(), dim, generator=g, dtype=torch.float64)
    return images.to(dtype), texts.to(dtype), t2i


# ----------------------------------------------------------------------------------------------
# retrieval_metrics
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk_size", [1, 3, 4096])
def test_chunked_equals_reference(seed, chunk_size, dtype):
    images, texts, t2i = _random_set(seed, ni=37, dim=12, dtype=dtype)
    got = retrieval_metrics(images, texts, t2i, ks=KS, chunk_size=chunk_size)
    ref = retrieval_metrics_reference(images, texts, t2i, ks=KS)
    assert got == ref, {k: (got[k], ref[k]) for k in ref if got[k] != ref[k]}
    assert got["num_images"] == 37 and got["num_texts"] == t2i.numel()
    assert 0.0 < got["image_to_text_R@1"] < 1.0 and 0.0 < got["text_to_image_R@1"] < 1.0
    for direction in ("image_to_text", "text_to_image"):
        recalls = [got[f"{direction}_R@{k}"] for k in KS]
        assert recalls == sorted(recalls)


def test_reference_agrees_with_argsort_ranks():
    """An independent oracle for the reference: ranks by sorting (no exact ties in random data)."""
    images, texts, t2i = _random_set(2, ni=25, dim=8, dtype=torch.float64)
    sims = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).t()
    order_t2i = sims.t().argsort(dim=1, descending=True)
    t2i_rank = (order_t2i == t2i[:, None]).int().argmax(dim=1)
    order_i2t = sims.argsort(dim=1, descending=True)
    i2t_rank = torch.stack([torch.nonzero(t2i[order_i2t[i]] == i)[0, 0] for i in range(25)])
    ref = retrieval_metrics_reference(images, texts, t2i, ks=KS)
    for k in KS:
        assert ref[f"text_to_image_R@{k}"] == pytest.approx((t2i_rank < k).double().mean().item())
        assert ref[f"image_to_text_R@{k}"] == pytest.approx((i2t_rank < k).double().mean().item())


def test_hand_made_case():
    # Images are the axes of R^4, so sims[i, t] = texts[t, i] / |texts[t]|; every text is a
    # permutation of (3, 2, 1, 0): the same norm, so the integers are the scores, exactly.
    images = torch.eye(4)
    texts = torch.tensor([[3, 2, 1, 0],    # image 0: nothing above 3             -> rank 0
                          [3, 2, 1, 0],    # image 1: 3 above 2                   -> rank 1
                          [0, 1, 2, 3],    # image 2: 3 above 2                   -> rank 1
                          [3, 0, 1, 2],    # image 3: 3 above 2                   -> rank 1
                          [0, 3, 1, 2],    # image 1: nothing above 3             -> rank 0
                          [2, 1, 3, 0]],   # image 3: 2, 1, 3 above 0             -> rank 3
                         dtype=torch.float32)
    t2i = torch.tensor([0, 1, 2, 3, 1, 3])
    # image -> text (columns of the table), counting only WRONG captions (other images') that score
    # >= the image's best own caption: image 0 scores (3,3,0,3,0,2), own caption 0 (3) ties with
    # texts 1 and 3 -> 2 wrong; image 1 (2,2,1,0,3,1), best own caption 4 (3) -> 0 wrong; image 2
    # (1,1,2,1,1,3), own caption 2 (2) under text 5 -> 1; image 3 (0,0,3,2,2,0), best own caption
    # 3 (2) under text 2 and tied with text 4 -> 2 wrong.  (The old rule, ties for the correct
    # item, gave 0, 0, 1, 1.)
    expected = {"image_to_text_R@1": 1 / 4, "image_to_text_R@2": 2 / 4, "image_to_text_R@3": 1.0,
                "image_to_text_R@10": 1.0,
                "text_to_image_R@1": 2 / 6, "text_to_image_R@2": 5 / 6, "text_to_image_R@3": 5 / 6,
                "text_to_image_R@10": 1.0, "num_images": 4, "num_texts": 6}
    for chunk_size in (1, 2, 1024):
        got = retrieval_metrics(images, texts, t2i, ks=(1, 2, 3, 10), chunk_size=chunk_size)
        assert got == pytest.approx(expected)
    assert retrieval_metrics_reference(images, texts, t2i, ks=(1, 2, 3, 10)) == pytest.approx(expected)


def _both(images, texts, t2i, ks):
    """retrieval_metrics at several chunk sizes, checked equal to the reference; one of them."""
    ref = retrieval_metrics_reference(images, texts, t2i, ks=ks)
    for chunk_size in (1, 2, 1024):
        assert retrieval_metrics(images, texts, t2i, ks=ks, chunk_size=chunk_size) == ref
    return ref


def test_all_ties_score_nothing():
    # A collapsed model: every score ties.  Every wrong candidate is >= the correct one, so with
    # N candidates (N - 1 wrong) a query is a hit at k iff N - 1 < k, whatever their order.
    # Features of ones in D = 16: normalised to exactly 1/4, every score exactly 1.
    same = torch.ones(5, 16)
    t2i = torch.tensor([4, 3, 2, 1, 0])
    m = _both(same, same.clone(), t2i, ks=(1, 4, 5))
    for direction in ("image_to_text", "text_to_image"):
        assert (m[f"{direction}_R@1"], m[f"{direction}_R@4"], m[f"{direction}_R@5"]) == (0.0, 0.0, 1.0)
    # Several captions per image: image i's own captions never count against it, the others do
    # (7 - 3 = 4 wrong for image 0, 5 for images 1 and 2); a text has 3 - 1 = 2 wrong images.
    t2i = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    m = _both(torch.ones(3, 16), torch.ones(7, 16), t2i, ks=(1, 2, 3, 4, 5, 6))
    assert [m[f"image_to_text_R@{k}"] for k in (1, 2, 3, 4, 5, 6)] == [0, 0, 0, 0, 1 / 3, 1.0]
    assert [m[f"text_to_image_R@{k}"] for k in (1, 2, 3, 4, 5, 6)] == [0, 0, 1.0, 1.0, 1.0, 1.0]


def test_ties_count_against_the_correct_item():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    m = _both(images, texts, torch.tensor([0, 1, 2]), ks=(1, 2, 3))
    # text 0 -> image 0 (1) ties with image 1 (1): 1 wrong, a miss at 1, a hit at 2;
    # text 1 -> image 1 (0) under image 2 (1), tied with image 0 (0): 2 wrong, a hit only at 3;
    # text 2 -> image 2 (0) under images 0 and 1 (1): 2 wrong.
    assert (m["text_to_image_R@1"], m["text_to_image_R@2"], m["text_to_image_R@3"]) == (0.0, 1 / 3, 1.0)
    # image 0 (scores 1, 0, 1) -> caption 0 ties with text 2: 1 wrong; image 1 (1, 0, 1) -> caption
    # 1 (0) under texts 0 and 2: 2 wrong; image 2 (0, 1, 0) -> caption 2 (0) under text 1, tied
    # with text 0: 2 wrong.
    assert (m["image_to_text_R@1"], m["image_to_text_R@2"], m["image_to_text_R@3"]) == (0.0, 1 / 3, 1.0)
    # Ties among an image's OWN captions, or among wrong candidates below the correct one, cost
    # nothing: image 0's two captions tie at the top, text 2 is below; image 1 ties with nobody.
    images, texts = torch.eye(3)[:2], torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])
    m = _both(images, texts, torch.tensor([0, 0, 1]), ks=(1,))
    assert m["image_to_text_R@1"] == 1.0 and m["text_to_image_R@1"] == 1.0


def _exact_tie_set(seed, ni=12, nt=30):
    """Images are axes of R^4 (several share one), every text a permutation of (3, 2, 1, 0): all
    texts have the same norm, so each score is an integer / sqrt(14) computed exactly alike, and
    ties (shared axes, repeated permutations) are exact.  Returns features, t2i and the integer
    score table [Ni, Nt]."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.randint(0, 4, (ni,), generator=g)
    images = torch.eye(4, dtype=torch.float64)[axes]
    base = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    texts = torch.stack([base[torch.randperm(4, generator=g)] for _ in range(nt)])
    t2i = torch.cat([torch.arange(ni), torch.randint(0, ni, (nt - ni,), generator=g)])
    t2i = t2i[torch.randperm(nt, generator=g)]
    return images, texts, t2i, texts[:, axes].t()


def _brute_force(scores, t2i, k, optimistic=False):
    """Recall@k by explicit counting of the wrong candidates >= the best correct one
    (``optimistic``: the old rule, only wrong candidates strictly above count)."""
    s, own = scores.tolist(), t2i.tolist()
    above = (lambda v, c: v > c) if optimistic else (lambda v, c: v >= c)
    i2t = []
    for i, row in enumerate(s):
        best = max(v for t, v in enumerate(row) if own[t] == i)
        i2t.append(sum(above(v, best) for t, v in enumerate(row) if own[t] != i) < k)
    t2i_hits = []
    for t, i in enumerate(own):
        t2i_hits.append(sum(above(s[j][t], s[i][t]) for j in range(len(s)) if j != i) < k)
    return sum(i2t) / len(i2t), sum(t2i_hits) / len(t2i_hits)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_ties_match_a_brute_force_count(seed):
    images, texts, t2i, scores = _exact_tie_set(seed)
    ks = (1, 2, 3, 5, 10)
    m = _both(images, texts, t2i, ks=ks)
    for k in ks:
        i2t, t2i_r = _brute_force(scores, t2i, k)
        assert m[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert m[f"text_to_image_R@{k}"] == pytest.approx(t2i_r)
    # the ties are real: the old, optimistic rule would have scored higher at k = 1
    old_i2t, old_t2i = _brute_force(scores, t2i, 1, optimistic=True)
    assert m["image_to_text_R@1"] < old_i2t and m["text_to_image_R@1"] < old_t2i
    # and the result still does not depend on the order of images or texts
    g = torch.Generator().manual_seed(100 + seed)
    pi, pt = torch.randperm(images.shape[0], generator=g), torch.randperm(t2i.numel(), generator=g)
    inv_i = torch.argsort(pi)
    assert _both(images[pi], texts[pt], inv_i[t2i[pt]], ks=ks) == m


def test_result_does_not_depend_on_item_order():
    images, texts, t2i = _random_set(3, ni=20, dim=6, dtype=torch.float64)
    images[5] = images[4]  # exact duplicates: ties that a sort would break by position
    texts[7] = texts[3]
    g = torch.Generator().manual_seed(0)
    pi, pt = torch.randperm(20, generator=g), torch.randperm(t2i.numel(), generator=g)
    inv_i = torch.argsort(pi)
    base = retrieval_metrics(images, texts, t2i, ks=KS, chunk_size=3)
    permuted = retrieval_metrics(images[pi], texts[pt], inv_i[t2i[pt]], ks=KS, chunk_size=3)
    assert base == permuted


def test_k_above_the_candidate_count_is_one():
    images, texts, t2i = _random_set(4, ni=6, dim=4, dtype=torch.float32)
    m = retrieval_metrics(images, texts, t2i, ks=(1, 100))
    assert m["image_to_text_R@100"] == 1.0 and m["text_to_image_R@100"] == 1.0
    assert retrieval_metrics(images[:1], texts[:1], torch.zeros(1, dtype=torch.long), ks=(1, 5))[
        "text_to_image_R@1"] == 1.0


class _LargestResult(TorchFunctionMode):
    """Records the largest tensor any torch call returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_stays_within_chunks():
    ni, dim, chunk = 60, 4, 5
    images, texts, t2i = _random_set(5, ni=ni, dim=dim, dtype=torch.float32)
    nt = t2i.numel()
    with _LargestResult() as mode:
        retrieval_metrics(images, texts, t2i, chunk_size=chunk)
    assert mode.largest <= chunk * max(ni, nt), (mode.largest, chunk, ni, nt)
    with _LargestResult() as mode:
        retrieval_metrics_reference(images, texts, t2i)
    assert mode.largest >= ni * nt  # the check sees the full matrix when there is one


@pytest.mark.parametrize("args, exc, match", [
    ((torch.randn(3, 8), torch.randn(3, 6), torch.arange(3)), ValueError,
     r"image_features and text_features must have the same feature dim, got \(3, 8\) and \(3, 6\)"),
    ((torch.randn(3, 8), torch.randn(4, 8), torch.arange(3)), ValueError,
     "text_to_image must have one entry per text, got 3 entries and 4 text_features"),
    ((torch.randn(3, 8), torch.randn(3, 8), torch.tensor([0, 1, 3])), ValueError,
     r"text_to_image must index images in \[0, 3\), got \[3\]"),
    ((torch.randn(3, 8), torch.randn(3, 8), torch.tensor([0, 1, 1])), ValueError,
     "text_to_image: 1 of the 3 images have no caption"),
    ((torch.randn(3, 8), torch.randn(3, 8), torch.arange(3.0)), ValueError,
     "text_to_image must be an integer"),
    ((torch.randn(3, 8), torch.randn(3, 8), [0, 1, 2]), TypeError, "text_to_image must be a torch.Tensor"),
    ((torch.randn(8), torch.randn(3, 8), torch.arange(3)), ValueError,
     "image_features must be a floating-point"),
    ((torch.randn(3, 8), torch.arange(24).view(3, 8), torch.arange(3)), ValueError,
     "text_features must be a floating-point"),
    ((torch.randn(0, 8), torch.randn(3, 8), torch.arange(3)), ValueError, "image_features is empty"),
    ((torch.randn(3, 8), torch.full((3, 8), math.inf), torch.arange(3)), ValueError,
     "text_features contains NaN or inf"),
])
def test_refusals_name_the_argument(args, exc, match):
    with pytest.raises(exc, match=match):
        retrieval_metrics(*args)
    with pytest.raises(exc, match=match):
        retrieval_metrics_reference(*args)


def test_refuses_bad_ks_and_chunk_size():
    args = (torch.randn(3, 8), torch.randn(3, 8), torch.arange(3))
    with pytest.raises(ValueError, match="ks must be positive ints"):
        retrieval_metrics(*args, ks=(1, 0))
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        retrieval_metrics(*args, chunk_size=0)


# ----------------------------------------------------------------------------------------------
# evaluate_retrieval
# ----------------------------------------------------------------------------------------------
def test_evaluate_end_to_end_on_the_built_in_dataset(model, shapes):
    model.train()
    model.transformer.eval()
    before = [m.training for m in model.modules()]
    got = evaluate_retrieval(model, _loader(shapes), progress=True, chunk_size=7)
    assert [m.training for m in model.modules()] == before
    model.eval()
    assert got["num_images"] == 64 and got["num_texts"] == 64
    assert all(0.0 <= v <= 1.0 for k, v in got.items() if "_R@" in k)
    fi, ft = [], []
    with torch.no_grad():
        for images, tokens, _labels in _loader(shapes):
            fi.append(model.encode_image(images, normalize=True))
            ft.append(model.encode_text(tokens, normalize=True))
    fi, ft = torch.cat(fi), torch.cat(ft)
    assert got == retrieval_metrics(fi, ft, torch.arange(64))
    assert got == retrieval_metrics_reference(fi, ft, torch.arange(64))
    part = evaluate_retrieval(model, _loader(shapes, return_meta=True), max_batches=2)
    assert part == retrieval_metrics(fi[:32], ft[:32], torch.arange(32))


def test_evaluate_with_several_captions_per_image(model, shapes):
    """``tokenizer``: each non-empty line of a sample's text is a caption of its image; a set of one
    line per sample gives the same numbers as without it."""
    import fastclip

    tok = fastclip.get_tokenizer("ViT-B-32")
    one = evaluate_retrieval(model, _loader(shapes, return_meta=True), tokenizer=tok)
    assert one == evaluate_retrieval(model, _loader(shapes))

    def doubled():  # every image gets its caption twice: two relevant texts per image
        for images, tokens, labels, meta in _loader(shapes, return_meta=True):
            yield images, tokens, labels, {**meta, "captions": [f"{c}\n{c}" for c in meta["captions"]]}

    two = evaluate_retrieval(model, doubled(), tokenizer=tok)
    assert two["num_images"] == 64 and two["num_texts"] == 128
    assert two["text_to_image_R@1"] == one["text_to_image_R@1"]  # each copy finds the same image
    with pytest.raises(ValueError, match="with a tokenizer, the last item must be the loader's meta dict"):
        evaluate_retrieval(model, _loader(shapes), tokenizer=tok)


def test_evaluate_under_autocast(model, shapes):
    m = evaluate_retrieval(model, _loader(shapes), autocast_dtype=torch.bfloat16, max_batches=1)
    assert m["num_images"] == 16 and 0.0 <= m["text_to_image_R@1"] <= 1.0


def test_evaluate_refusals(model):
    images, tokens = torch.randn(4, 3, 32, 32), torch.zeros(4, 77, dtype=torch.long)
    with pytest.raises(ValueError, match="batches: the evaluation set is empty"):
        evaluate_retrieval(model, [])
    with pytest.raises(ValueError, match="the second item must be the tokens"):
        evaluate_retrieval(model, [(images, torch.arange(4))])
    with pytest.raises(ValueError, match="batch 0: 3 captions for 4 images"):
        evaluate_retrieval(model, [(images, tokens[:3])])
    with pytest.raises(ValueError, match="batches must yield tuples"):
        evaluate_retrieval(model, [images])
    with pytest.raises(ValueError, match="max_batches must be None or a positive int"):
        evaluate_retrieval(model, [(images, tokens)], max_batches=-1)
    with pytest.raises(ValueError, match="autocast_dtype must be"):
        evaluate_retrieval(model, [(images, tokens)], autocast_dtype=torch.int8)
