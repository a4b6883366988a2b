import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from uvclab.engine import data
from uvclab.engine.data import load_dataset, read_idx, split_indices
from uvclab.errors import UvclabError


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split_seed=0)


def test_digits_sizes_shapes_and_classes(digits):
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1257, 270, 270)
    assert (digits.num_classes, digits.in_chans, digits.img_size, digits.name) == (10, 1, 8, "digits")
    x, y = digits.val[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    assert sorted(set(digits.test.labels.tolist())) == list(range(10))


def test_digits_splits_disjoint_and_cover_everything(digits):
    parts = [set(s.index.tolist()) for s in (digits.train, digits.val, digits.test)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert set().union(*parts) == set(range(1797))


def test_splits_fixed_by_seed(digits):
    again = load_dataset("digits", split_seed=0)
    other = load_dataset("digits", split_seed=1)
    for name in ("train", "val", "test"):
        assert np.array_equal(getattr(digits, name).index, getattr(again, name).index)
    assert not np.array_equal(digits.test.index, other.test.index)


def test_normalization_gives_zero_mean_unit_std(digits):
    x = torch.stack([digits.val[i][0] for i in range(len(digits.val))] +
                    [digits.test[i][0] for i in range(len(digits.test))])
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1


def test_digits_are_never_augmented(digits):
    assert torch.equal(digits.train[0][0], digits.train[0][0])


def test_augmentation_only_on_train_and_only_when_asked(tmp_path):
    fake_fashion(tmp_path)
    s = load_dataset("fashion_mnist", root=tmp_path, download=False, val_fraction=0.5)
    plain = load_dataset("fashion_mnist", root=tmp_path, download=False, val_fraction=0.5, augment=False)
    pad = s.train.crop_padding
    assert pad > 0 and s.train.hflip
    # every draw is exactly one of the (2 pad + 1)^2 zero-padded shifts of the plain image, flipped or not,
    # and 200 draws reach most of them, flips both ways (a fixed shift, no flip or no shift all fail here)
    x0 = plain.train[0][0] * data.FASHION_STD[0] + data.FASHION_MEAN[0]
    padded = torch.nn.functional.pad(x0, (pad,) * 4)
    h, w = x0.shape[-2:]
    variants = {(i, j, f): (padded[:, i:i + h, j:j + w].flip(-1) if f else padded[:, i:i + h, j:j + w])
                for i in range(2 * pad + 1) for j in range(2 * pad + 1) for f in (0, 1)}
    torch.manual_seed(0)
    seen = set()
    for _ in range(200):
        x = s.train[0][0] * data.FASHION_STD[0] + data.FASHION_MEAN[0]
        match = [k for k, v in variants.items() if torch.allclose(x, v, atol=1e-5)]
        assert match, "an augmented image that is no padded shift / flip of the original"
        seen.update(match)
    assert {f for _, _, f in seen} == {0, 1} and len({(i, j) for i, j, _ in seen}) >= (2 * pad + 1) ** 2 // 2
    assert torch.equal(s.val[0][0], s.val[0][0]) and torch.equal(s.test[3][0], s.test[3][0])
    assert torch.equal(plain.train[0][0], plain.train[0][0])
    # augmentation is a crop of the zero-padded [0, 1] image (black borders), then normalization
    shifted = torch.stack([s.train[1][0] for _ in range(50)]) * data.FASHION_STD[0] + data.FASHION_MEAN[0]
    assert shifted.min() >= -1e-6 and shifted.max() <= 1 + 1e-6


def test_img_size_resizes(digits):
    big = load_dataset("digits", img_size=16)
    assert big.img_size == 16 and big.train[0][0].shape == (1, 16, 16)


def test_split_indices_stratified_and_disjoint():
    labels = np.repeat(np.arange(4), 50)
    kept, held = split_indices(labels, 0.2, seed=3)
    assert len(held) == 40 and not set(kept) & set(held)
    assert np.bincount(labels[held]).tolist() == [10, 10, 10, 10]
    with pytest.raises(UvclabError, match="val_fraction"):
        split_indices(labels, 1.5, seed=0)


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion(folder, n_train=60, n_test=20):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        img, lbl = data.FASHION_FILES[split]
        write_idx(folder / img, rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / lbl, np.arange(n) % 10)


def test_fashion_mnist_from_idx_folder(tmp_path):
    fake_fashion(tmp_path)
    s = load_dataset("fashion_mnist", root=tmp_path, download=False, val_fraction=0.5)
    assert (len(s.train), len(s.val), len(s.test)) == (30, 30, 20)
    assert s.train[0][0].shape == (1, 28, 28) and (s.num_classes, s.in_chans) == (10, 1)
    assert not set(s.train.index) & set(s.val.index)
    assert read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz").tolist() == [i % 10 for i in range(20)]


def test_truncated_idx_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + b"\x00" * 10)
    with pytest.raises(UvclabError, match="truncated"):
        read_idx(path)


def test_missing_fashion_mnist_names_the_fix(tmp_path, monkeypatch):
    with pytest.raises(UvclabError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", root=tmp_path, download=False)
    # without root: UVCLAB_DATA and the Debian folder are searched; both empty here
    monkeypatch.setenv("UVCLAB_DATA", str(tmp_path))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(UvclabError, match="UVCLAB_DATA") as err:
        load_dataset("fashion_mnist", download=False)
    assert "root=" in str(err.value) and "download" in str(err.value)


def test_fashion_mnist_found_under_uvclab_data(tmp_path, monkeypatch):
    (tmp_path / "fashion-mnist").mkdir()
    fake_fashion(tmp_path / "fashion-mnist")
    monkeypatch.setenv("UVCLAB_DATA", str(tmp_path))
    assert len(load_dataset("fashion_mnist", download=False).test) == 20


@pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_split_sizes():
    s = load_dataset("fashion_mnist", root=data.DEBIAN_FASHION_MNIST, download=False)
    assert (len(s.train), len(s.val), len(s.test)) == (54000, 6000, 10000)
    test = data.fashion_mnist_test(data.DEBIAN_FASHION_MNIST, download=False)   # the test split alone
    assert torch.equal(test.images, s.test.images) and torch.equal(test.labels, s.test.labels)


def test_unknown_and_unavailable_datasets(tmp_path):
    with pytest.raises(UvclabError, match="digits, fashion_mnist, cifar10"):
        load_dataset("mnist")
    with pytest.raises(UvclabError, match="train/<class>"):
        load_dataset("imagefolder", root=tmp_path)
    with pytest.raises(UvclabError, match="download=True"):
        load_dataset("cifar10", root=tmp_path, download=False)


# ---- fetching Fashion-MNIST when it is missing: torchvision, then the Debian package (no network here) -----

class FakeApt:
    """Stands in for apt-get / dpkg-deb: `lists` says whether the system's apt lists know the package;
    `registry` whether the package registry answers. Records every command."""

    def __init__(self, lists=True, registry=True):
        self.lists, self.registry, self.calls = lists, registry, []

    def __call__(self, cmd, cwd):
        import subprocess
        self.calls.append(cmd)
        ok = lambda: subprocess.CompletedProcess(cmd, 0, "", "")  # noqa: E731
        fail = lambda msg: subprocess.CompletedProcess(cmd, 100, "", msg)  # noqa: E731
        if cmd[0] == "dpkg-deb":
            dest = Path(cmd[3]) / "usr/share/datasets/fashion-mnist"
            dest.mkdir(parents=True)
            fake_fashion(dest)
            return ok()
        private = any(c.startswith("Dir::State::Lists=") for c in cmd)
        if cmd[-1] == "update":
            return ok() if self.registry else fail("E: Failed to fetch http://deb.debian.org ... (offline)")
        if (private or self.lists) and self.registry:
            (Path(cwd) / f"{cmd[-1]}_0.1-1_all.deb").write_bytes(b"deb")
            return ok()
        return fail(f"E: Unable to locate package {cmd[-1]}")


def _offline_torchvision(monkeypatch):
    import urllib.error

    import torchvision

    def no_network(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", no_network)


@pytest.mark.parametrize("lists", [True, False], ids=["apt-lists", "fresh-machine"])
def test_fashion_mnist_fetched_from_debian_when_torchvision_fails(tmp_path, monkeypatch, lists):
    from uvclab.engine import debian_data
    fake = FakeApt(lists=lists)
    _offline_torchvision(monkeypatch)
    monkeypatch.setattr(debian_data, "_run", fake)
    monkeypatch.setattr(debian_data.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setenv("UVCLAB_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    s = load_dataset("fashion_mnist", val_fraction=0.5)
    assert len(s.test) == 20 and (tmp_path / "data" / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").is_file()
    assert not list((tmp_path / "data" / "fashion-mnist").glob(".*part"))
    assert fake.calls[0] == ["apt-get", "download", "dataset-fashion-mnist"] and fake.calls[-1][0] == "dpkg-deb"
    assert any(c[-1] == "update" for c in fake.calls) == (not lists)   # private lists only when needed
    n = len(fake.calls)
    load_dataset("fashion_mnist", val_fraction=0.5)                      # now found in the data folder
    assert len(fake.calls) == n


def test_fashion_mnist_offline_without_registry_names_the_fix(tmp_path, monkeypatch):
    from uvclab.engine import debian_data
    _offline_torchvision(monkeypatch)
    monkeypatch.setattr(debian_data, "_run", FakeApt(lists=False, registry=False))
    monkeypatch.setattr(debian_data.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    with pytest.raises(UvclabError) as err:
        load_dataset("fashion_mnist", root=tmp_path)
    msg = str(err.value)
    assert "torchvision's download" in msg and "name resolution" in msg and "apt-get download" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "UVCLAB_DATA" in msg
    assert not list(tmp_path.glob("fashion-mnist/*.gz"))
    monkeypatch.setattr(debian_data.shutil, "which", lambda tool: None)   # not Debian at all
    with pytest.raises(UvclabError, match="not a Debian"):
        load_dataset("fashion_mnist", root=tmp_path)
