"""Datasets as fixed train / validation / test splits: `load_dataset(name) -> Splits`.

`digits` (scikit-learn's bundled 8x8 digits) needs no set-up and is the embedded default; `fashion_mnist`
is read from IDX files in memory (Debian package `dataset-fashion-mnist`, UVCLAB_DATA, or torchvision's
download); `cifar10` / `cifar100` and `imagefolder` (ImageNet layout) go through torchvision with the
DeiT/UVC transforms (RandomResizedCrop + flip, Resize + CenterCrop, ImageNet mean/std; method doc 5.1).
Validation is always carved from the training set by `split_seed` (stratified), so the test set is
never used for model selection (batches: `uvclab.engine.loop.seeded_loader`).
"""
from __future__ import annotations

import gzip
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from uvclab.errors import UvclabError
from uvclab.paths import data_dir

DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
               "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3760,)    # over all 1797 images, pixels scaled to [0, 1]
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)  # over the 60k training images
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")  # label 0..9
DEFAULT_VAL_FRACTION = {"digits": 0.15, "fashion_mnist": 0.1, "cifar10": 0.1, "cifar100": 0.1, "imagefolder": 0.02}


@dataclass
class Splits:
    """Three torch Datasets yielding (normalized float image (C, H, W), int label), plus their shape."""
    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int


# ---- in-memory tensors (digits, fashion_mnist) ---------------------------------------------------------

class TensorImages(Dataset):
    """Images kept in memory as (N, C, H, W) uint8 or [0, 1] float; augmented and normalized per item.

    Augmentation (train split only) works on the [0, 1] image before normalization, like torchvision's
    RandomCrop(padding) + RandomHorizontalFlip on PIL images: zero padding means black borders.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 crop_padding: int = 0, hflip: bool = False, index: Optional[np.ndarray] = None):
        self.images, self.labels = images, labels.long()
        self.index = np.arange(len(labels)) if index is None else index  # positions in the source set
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.crop_padding, self.hflip = crop_padding, hflip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()  # (C, H, W) in [0, 1]
        if self.crop_padding:
            x = random_crop(x, self.crop_padding)
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return (x - self.mean) / self.std, int(self.labels[i])


def random_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad (C, H, W) by `padding` on each side and cut a random H x W window (a shift of up to padding)."""
    h, w = x.shape[-2:]
    x = F.pad(x, (padding,) * 4)
    i, j = torch.randint(0, 2 * padding + 1, (2,)).tolist()
    return x[:, i:i + h, j:j + w]


def resize_images(images: torch.Tensor, img_size: Optional[int]) -> torch.Tensor:
    """Resize a whole (N, C, H, W) stack once (bilinear, antialiased); dtype is kept."""
    if img_size is None or img_size == images.shape[-1]:
        return images
    out = F.interpolate(images.float(), size=(img_size, img_size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8) if images.dtype == torch.uint8 else out


def split_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices, stratified by label and fixed by seed; held-out is `fraction` of the data."""
    from sklearn.model_selection import train_test_split
    if not 0 < fraction < 1:
        raise UvclabError(f"val_fraction={fraction} must be in (0, 1).")
    idx = np.arange(len(labels))
    counts = np.unique(labels, return_counts=True)[1]
    n_held = int(np.ceil(fraction * len(labels)))
    stratify = labels if counts.min() >= 2 and len(counts) <= min(n_held, len(labels) - n_held) else None
    kept, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=stratify)
    return np.sort(kept), np.sort(held)


def _in_memory_splits(name, train_x, train_y, test_x, test_y, val_fraction, split_seed, mean, std,
                      crop_padding, hflip, augment, num_classes, train_index=None, test_index=None) -> Splits:
    tr, va = split_indices(train_y.numpy(), val_fraction, split_seed)
    train_index = np.arange(len(train_y)) if train_index is None else train_index
    train = TensorImages(train_x[tr], train_y[tr], mean, std, crop_padding if augment else 0, hflip and augment,
                         index=train_index[tr])
    val = TensorImages(train_x[va], train_y[va], mean, std, index=train_index[va])
    test = TensorImages(test_x, test_y, mean, std, index=test_index)
    return Splits(name, train, val, test, num_classes, train_x.shape[1], train_x.shape[-1])


def load_digits(split_seed: int = 0, val_fraction: Optional[float] = None, img_size: Optional[int] = None,
                augment: bool = True) -> Splits:
    """scikit-learn's 8x8 digits: 70 / 15 / 15 % stratified train / val / test, no augmentation.

    A 1-pixel shift is 12 % of an 8x8 image (60-epoch teacher runs: 92 % test with shifts at batch 64,
    98 % without at batch 32) and a mirrored digit is another glyph, so `augment` has no effect here.
    """
    from sklearn.datasets import load_digits as sk_digits
    d = sk_digits()
    x = resize_images(torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16, img_size)  # (1797, 1, 8, 8)
    y = torch.tensor(d.target)
    rest, test = split_indices(d.target, 0.15, split_seed)  # the test set depends on the seed only
    frac = (val_fraction or DEFAULT_VAL_FRACTION["digits"]) / 0.85  # val as a fraction of the whole set
    return _in_memory_splits("digits", x[rest], y[rest], x[test], y[test], frac, split_seed, DIGITS_MEAN,
                             DIGITS_STD, crop_padding=0, hflip=False, augment=augment, num_classes=10,
                             train_index=rest, test_index=test)


# ---- Fashion-MNIST -------------------------------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (.gz or plain) of unsigned bytes: magic (0, 0, 0x08, ndim), ndim big-endian sizes, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UvclabError(f"'{path}' is not an IDX file of unsigned bytes; re-download Fashion-MNIST.")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise UvclabError(f"'{path}' is truncated ({data.size} bytes for shape {shape}); re-download it.")
    return data.reshape(shape)


def _has_fashion(folder: Path) -> Optional[Path]:
    """The folder holding the four IDX files: folder itself, folder/fashion-mnist or torchvision's layout."""
    for cand in (folder, folder / "fashion-mnist", folder / "FashionMNIST" / "raw"):
        if all((cand / f).is_file() for pair in FASHION_FILES.values() for f in pair):
            return cand
    return None


def find_fashion_mnist(root: Optional[str | Path] = None, download: bool = True) -> Path:
    """Folder with Fashion-MNIST: `root` if given, else $UVCLAB_DATA (or data/), else the Debian package's
    folder. When missing and `download`: torchvision's download into root (or the data folder), and if that
    fails (offline), the Debian package fetched without root (`apt-get download` + `dpkg-deb -x`, the same
    files) into root/fashion-mnist (or the data folder's)."""
    candidates = [Path(root)] if root is not None else [data_dir(), DEBIAN_FASHION_MNIST]
    for folder in candidates:
        found = _has_fashion(folder)
        if found is not None:
            return found
    target = Path(root) if root is not None else data_dir()
    fix = ("Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, files in "
           f"{DEBIAN_FASHION_MNIST}), or put the four *-ubyte.gz files in a folder and pass root=FOLDER "
           "(--set data_root=FOLDER) or set UVCLAB_DATA=FOLDER (files in FOLDER/fashion-mnist), "
           "or go online (or reach a Debian package mirror) and let uvclab download it (download=True).")
    where = f"Fashion-MNIST not found in {[str(c) for c in candidates]}"
    if not download:
        raise UvclabError(f"{where}. {fix}")
    try:
        import torchvision
        for train in (True, False):
            torchvision.datasets.FashionMNIST(str(target), train=train, download=True)
        return _has_fashion(target) or target
    except Exception as e:  # offline: URLError, timeouts, partial files
        tv_error = f"torchvision's download into '{target}' failed ({str(e).splitlines()[0][:200]})"
    from uvclab.engine.debian_data import FASHION_MEMBER, FASHION_PACKAGE, fetch_deb_files
    names = [f for pair in FASHION_FILES.values() for f in pair]
    try:
        return fetch_deb_files(FASHION_PACKAGE, FASHION_MEMBER, target / "fashion-mnist", names)
    except (UvclabError, OSError, subprocess.SubprocessError) as e:
        raise UvclabError(f"{where}; {tv_error}; fetching the Debian package failed too ({e}). {fix}") from e


def _fashion_arrays(folder: Path, split: str, img_size: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    img_file, lbl_file = FASHION_FILES[split]
    x = torch.from_numpy(read_idx(folder / img_file).copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
    return resize_images(x, img_size), torch.from_numpy(read_idx(folder / lbl_file).astype(np.int64))


def load_fashion_mnist(root=None, split_seed: int = 0, val_fraction: Optional[float] = None,
                       img_size: Optional[int] = None, augment: bool = True, download: bool = True) -> Splits:
    """Fashion-MNIST 28x28: val carved from the 60k training images, test = the official 10k."""
    folder = find_fashion_mnist(root, download)
    (tx, ty), (sx, sy) = (_fashion_arrays(folder, split, img_size) for split in ("train", "test"))
    return _in_memory_splits("fashion_mnist", tx, ty, sx, sy, val_fraction or DEFAULT_VAL_FRACTION["fashion_mnist"],
                             split_seed, FASHION_MEAN, FASHION_STD, crop_padding=2, hflip=True, augment=augment,
                             num_classes=10)


def fashion_mnist_test(root=None, img_size: Optional[int] = None, download: bool = True) -> TensorImages:
    """Only the official 10k Fashion-MNIST test images (the same items as `load_fashion_mnist(...).test`),
    without reading the 60k training images."""
    return TensorImages(*_fashion_arrays(find_fashion_mnist(root, download), "test", img_size), FASHION_MEAN,
                        FASHION_STD)


# ---- torchvision datasets (CIFAR, ImageFolder) -----------------------------------------------------------

def _transforms(train: bool, img_size: int, mean, std, native: Optional[int] = None):
    """DeiT/UVC transforms: RandomResizedCrop + flip for training, Resize(size/0.875) + CenterCrop for eval.
    CIFAR at its native 32x32 uses the usual RandomCrop(32, padding=4) + flip instead."""
    from torchvision import transforms as T
    if native == img_size:
        aug = [T.RandomCrop(img_size, padding=4), T.RandomHorizontalFlip()] if train else []
    elif train:
        aug = [T.RandomResizedCrop(img_size), T.RandomHorizontalFlip()]
    else:
        aug = [T.Resize(int(img_size / 0.875)), T.CenterCrop(img_size)]
    return T.Compose(aug + [T.ToTensor(), T.Normalize(mean, std)])


def load_cifar(name: str, root=None, split_seed: int = 0, val_fraction: Optional[float] = None,
               img_size: Optional[int] = None, augment: bool = True, download: bool = True) -> Splits:
    """CIFAR-10/100 via torchvision: val carved from the 50k training images, test = the official 10k."""
    import torchvision
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    root = Path(root) if root is not None else data_dir() / name
    size = img_size or 32
    mean, std = CIFAR_STATS[name]
    try:
        make = lambda train, tf: cls(str(root), train=train, transform=tf, download=download)  # noqa: E731
        train_aug = make(True, _transforms(augment, size, mean, std, native=32))
        train_eval = make(True, _transforms(False, size, mean, std, native=32))
        test = make(False, _transforms(False, size, mean, std, native=32))
    except Exception as e:  # RuntimeError "Dataset not found", URLError offline
        raise UvclabError(f"{name} not found in '{root}' ({e}). Go online and pass download=True, or put the "
                          f"extracted torchvision archive under root=FOLDER (--set data_root=FOLDER).") from e
    tr, va = split_indices(np.asarray(train_aug.targets), val_fraction or DEFAULT_VAL_FRACTION[name], split_seed)
    return Splits(name, Subset(train_aug, tr.tolist()), Subset(train_eval, va.tolist()), test,
                  len(train_aug.classes), 3, size)


def load_imagefolder(root=None, split_seed: int = 0, val_fraction: Optional[float] = None,
                     img_size: Optional[int] = None, augment: bool = True) -> Splits:
    """ImageNet layout root/train/<class>/*, root/val/<class>/*: val carved from train, root/val is the test set."""
    from torchvision.datasets import ImageFolder
    if root is None or not (Path(root) / "train").is_dir() or not (Path(root) / "val").is_dir():
        raise UvclabError(f"imagefolder needs root=FOLDER (--set data_root=FOLDER) with FOLDER/train/<class>/ and "
                          f"FOLDER/val/<class>/ image folders (ImageNet layout); got root={root!r}.")
    size = img_size or 224
    tf = lambda train: _transforms(train, size, IMAGENET_MEAN, IMAGENET_STD)  # noqa: E731
    train_aug = ImageFolder(str(Path(root) / "train"), transform=tf(augment))
    train_eval = ImageFolder(str(Path(root) / "train"), transform=tf(False))
    test = ImageFolder(str(Path(root) / "val"), transform=tf(False))
    if test.classes != train_aug.classes:
        raise UvclabError(f"'{root}/val' and '{root}/train' hold different class folders; they must match.")
    tr, va = split_indices(np.asarray(train_aug.targets), val_fraction or DEFAULT_VAL_FRACTION["imagefolder"],
                           split_seed)
    return Splits("imagefolder", Subset(train_aug, tr.tolist()), Subset(train_eval, va.tolist()), test,
                  len(train_aug.classes), 3, size)


# ---- entry points --------------------------------------------------------------------------------------

def load_dataset(name: str, root: Optional[str | Path] = None, split_seed: int = 0,
                 val_fraction: Optional[float] = None, img_size: Optional[int] = None, augment: bool = True,
                 download: bool = True) -> Splits:
    """Train / val / test splits of a named dataset (see DATASETS).

    val_fraction: share of the training data held out for validation (None: DEFAULT_VAL_FRACTION; for
    digits, a share of all 1797 images). img_size: resize (None: native, 224 for imagefolder).
    augment: training-split augmentation. download: allow torchvision downloads when files are missing.
    """
    if name == "digits":
        return load_digits(split_seed, val_fraction, img_size, augment)
    if name == "fashion_mnist":
        return load_fashion_mnist(root, split_seed, val_fraction, img_size, augment, download)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, root, split_seed, val_fraction, img_size, augment, download)
    if name == "imagefolder":
        return load_imagefolder(root, split_seed, val_fraction, img_size, augment)
    raise UvclabError(f"Unknown dataset '{name}'. Choose one of: {', '.join(DATASETS)}.")


def model_kwargs_for_data(name: str, model_kwargs: dict, splits: Splits) -> dict:
    """timm's convention: the data decides `in_chans`, `num_classes` and `img_size` unless the user set them;
    where they are set and disagree with the data, a clear error names the mismatch and the fix."""
    kwargs = {"img_size": splits.img_size, "in_chans": splits.in_chans, "num_classes": splits.num_classes}
    for key, data_value in (("in_chans", splits.in_chans), ("num_classes", splits.num_classes)):
        if key in model_kwargs and model_kwargs[key] != data_value:
            raise UvclabError(f"{name}: {key}={model_kwargs[key]} but {splits.name} has {key}={data_value}; "
                              f"drop the {key} setting (the data decides it) or use other data.")
    if "img_size" in model_kwargs and model_kwargs["img_size"] != splits.img_size:
        raise UvclabError(f"{name}: img_size={model_kwargs['img_size']} but the {splits.name} images are "
                          f"{splits.img_size}x{splits.img_size}; load the data at the model's size.")
    kwargs.update(model_kwargs)
    return kwargs


def check_model_fits_data(model: torch.nn.Module, name: str, splits: Splits) -> None:
    """One forward pass on a real image; a model/data mismatch becomes one clear error instead of a deep
    RuntimeError (e.g. a 16-pixel patch on 8x8 images, a 3-channel stem on grey images)."""
    x, _ = splits.val[0]
    try:
        with torch.no_grad():
            out = model.eval()(x[None].to(next(model.parameters()).device))
    except RuntimeError as e:
        raise UvclabError(
            f"{name} does not fit the {splits.name} images ({splits.in_chans}x{splits.img_size}x{splits.img_size}): "
            f"{str(e).splitlines()[0]}. Set model_kwargs to match the data, e.g. "
            f"--set model_kwargs.img_size=224 (resize the images) or --set model_kwargs.patch_size=N "
            f"(a patch that divides {splits.img_size}).") from None
    logits = out[0] if isinstance(out, tuple) else out
    if logits.shape[-1] != splits.num_classes:
        raise UvclabError(f"{name} has {logits.shape[-1]} outputs but {splits.name} has {splits.num_classes} "
                          "classes; drop num_classes from model_kwargs (the data decides it).")
