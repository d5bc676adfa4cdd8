"""2 gloo ranks x n/2 samples through DDP give the one-process gradients of n samples: SLIP (views
gathered, the head and its BatchNorm on the global batch) and SigLIP, with and without accumulation."""
import pytest
import torch

from ..distributed._pool import DistPool
from ._dist_tasks import step_grads

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def pool():
    p = DistPool(2)
    yield p
    p.close()


@pytest.mark.parametrize("strategy,loss,views", [("slip", "clip", 2), ("clip", "siglip", 0)])
@pytest.mark.parametrize("accum", [1, 2])
def test_ddp_step_equals_one_process(pool, strategy, loss, views, accum):
    n = 8
    loss1, g1, bn1 = step_grads(strategy, loss, n, views, 1)
    results = pool.run("tests.train._dist_tasks:ddp_step_grads", strategy, loss, n, views, accum)
    for rank, (loss_r, g_r, bn_r) in enumerate(results):
        assert loss_r == pytest.approx(loss1, rel=1e-10), f"rank {rank}"
        assert g_r.keys() == g1.keys()
        largest = max(g.abs().max().item() for g in g1.values())
        for k in g1:
            # (a bias followed by BatchNorm has a zero gradient in exact arithmetic: rounding noise)
            scale = max(g1[k].abs().max().item(), 1e-3 * largest)
            err = (g_r[k] - g1[k]).abs().max().item()
            assert err <= 1e-9 * scale, f"rank {rank}: {k} differs by {err:.3g} (max {scale:.3g})"
        for k in bn1:  # the head's BatchNorm statistics: the global batch on every rank
            torch.testing.assert_close(bn_r[k], bn1[k], rtol=1e-10, atol=1e-12)
