"""fastclip.distributed.collectives on uneven blocks: gather, gather-with-gradient, reduce, scalars."""
import pytest
import torch


pytestmark = pytest.mark.distributed
TASKS = "tests.distributed._tasks"


def test_uneven_blocks_move_and_gradients_go_home(pool):
    counts = [3, 1]
    res = pool.run(f"{TASKS}:collectives", counts)
    xs = [torch.arange(c * 2, dtype=torch.float64).reshape(-1, 2) + 100 * r for r, c in enumerate(counts)]
    total = sum(counts)
    w = torch.arange(total * 2, dtype=torch.float64).reshape(total, 2)
    offs = [0, counts[0]]
    for r in range(2):
        for q in range(2):
            assert torch.equal(res[r]["blocks"][q], xs[q])
        # d/dx of sum_ranks sum(full * w * (rank + 1)) = w[rows of r] * (1 + 2)
        assert torch.equal(res[r]["grad"], 3 * w[offs[r]:offs[r] + counts[r]])
        # the reducer sums every rank's share onto the owner: (1) + (2)
        assert torch.equal(res[r]["own"], torch.full((counts[r], 2), 3.0, dtype=torch.float64))
        assert res[r]["sums"] == [3.0, 2.0]
        assert torch.equal(res[r]["even"], torch.tensor([[0.0], [0.0], [1.0], [1.0]]))
