import pytest

from fastclip.data import make_shapes_dataset


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A small built-in dataset (captions + labels) for end-to-end training runs, and held-out sets."""
    root = tmp_path_factory.mktemp("shapes")
    train = make_shapes_dataset(str(root / "train"), 640, 32, seed=0, samples_per_shard=160)
    zs = make_shapes_dataset(str(root / "zs"), 96, 32, seed=1, samples_per_shard=96, max_objects=1)
    ret = make_shapes_dataset(str(root / "ret"), 64, 32, seed=2, samples_per_shard=64)
    return {"train": train["shards_path"], "zero_shot": zs["shards_path"], "retrieval": ret["shards_path"],
            "root": str(root)}
