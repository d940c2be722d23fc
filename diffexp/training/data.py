"""Training data: the scikit-learn digits or a folder of images, in [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from diffexp.errors import DiffexpError
from diffexp.sampling.ideal import digits_images, digits_labels
from diffexp.training.config import DatasetConfig


class ImageFolderData(torch.utils.data.Dataset):
    """Every image under a folder (recursively), resized and centre-cropped, in [-1, 1]."""

    def __init__(self, root: Path, sample_size: int, channels: int) -> None:
        from torchvision import transforms
        from torchvision.datasets.folder import IMG_EXTENSIONS

        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        if not self.files:
            raise DiffexpError(f"dataset.path={root} holds no images ({', '.join(IMG_EXTENSIONS)}).")
        check_images(root, self.files)
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = transforms.Compose(
            [
                transforms.Resize(sample_size),
                transforms.CenterCrop(sample_size),
                transforms.ToTensor(),
                transforms.Normalize([0.5] * channels, [0.5] * channels),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.transform(im.convert(self.mode))


def check_images(root: Path, files: list[Path]) -> None:
    """Refuse a folder with files that PIL cannot open as images (their headers are read, before training)."""
    from PIL import Image, UnidentifiedImageError

    bad = []
    for path in files:
        try:
            with Image.open(path):
                pass
        except (UnidentifiedImageError, OSError, ValueError) as err:
            bad.append(f"{path.relative_to(root)} ({str(err).splitlines()[0][:100]})")
    if bad:
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise DiffexpError(
            f"dataset.path={root} holds {len(bad)} file(s) with an image's name that are not readable images: "
            f"{shown}. Remove or convert them, then train again."
        )


def load_dataset(cfg: DatasetConfig | DictConfig, labels: bool = False) -> torch.utils.data.Dataset:
    """The training images; with ``labels`` (class-conditional training) items are (image, label) pairs."""
    if cfg.name == "digits":
        if cfg.channels != 1:
            raise DiffexpError("dataset=digits has one channel; leave dataset.channels at 1.")
        if labels:
            return torch.utils.data.TensorDataset(digits_images(cfg.sample_size), digits_labels())
        return torch.utils.data.TensorDataset(digits_images(cfg.sample_size))
    if cfg.name == "folder":
        if labels:
            raise DiffexpError(
                "dataset=folder has no class labels: class-conditional training (num_classes) needs dataset=digits. "
                "Leave num_classes=null for a folder of images."
            )
        if not cfg.path:
            raise DiffexpError("dataset=folder needs dataset.path=DIR, a folder of images.")
        root = Path(cfg.path).expanduser()
        if not root.is_dir():
            raise DiffexpError(f"dataset.path={cfg.path} is not a folder.")
        if cfg.channels not in (1, 3):
            raise DiffexpError(f"dataset.channels={cfg.channels}: use 1 (greyscale) or 3 (RGB).")
        return ImageFolderData(root, cfg.sample_size, cfg.channels)
    raise DiffexpError(f"Unknown dataset '{cfg.name}'. Use dataset=digits or dataset=folder dataset.path=DIR.")


def batch_of(data: torch.utils.data.Dataset, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels) of the items at ``index``; labels is None for a dataset without them."""
    items = [data[i] for i in index.tolist()]
    images = torch.stack([x[0] if isinstance(x, tuple) else x for x in items])
    if items and isinstance(items[0], tuple) and len(items[0]) > 1:
        return images, torch.stack([torch.as_tensor(x[1]) for x in items]).long()
    return images, None
