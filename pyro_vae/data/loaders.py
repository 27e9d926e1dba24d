"""Minibatch loaders over data sets in memory, with exact resume."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from pyro_vae.data.dataset import BINARIZATIONS, DataError, Dataset
from pyro_vae.seeding import generator

__all__ = [
    "Affine",
    "BatchLoader",
    "Binarize",
    "Perturb",
    "SemiSupervisedLoader",
    "Shift",
    "Transform",
]


class Transform:
    """A random change applied to every batch as it is handed out, drawing from a
    ``torch.Generator`` of its own (so it changes no other draw) whose state is saved under
    ``key`` in the loader's state; ``what`` names it in messages."""

    key = ""
    what = ""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def state_dict(self) -> Tensor:
        """The generator's state."""
        return self.generator.get_state()

    def load_state_dict(self, state: Tensor) -> None:
        """Restore the generator's state."""
        self.generator.set_state(state)


class Binarize(Transform):
    """Dynamic binarisation: a fresh Bernoulli draw of every pixel each time it is used."""

    key, what = "binarize", "binarisation"

    def __call__(self, x: Tensor) -> Tensor:
        return torch.bernoulli(x, generator=self.generator)


class Perturb(Transform):
    """Each pixel, with probability ``rate``, replaced by a random value: a fair coin for
    binary images, uniform on [0, 1] otherwise."""

    key, what = "perturb", "perturbation"

    def __init__(self, generator: torch.Generator, rate: float, binary: bool) -> None:
        super().__init__(generator)
        self.rate, self.binary = rate, binary

    def __call__(self, x: Tensor) -> Tensor:
        hit = torch.rand(x.shape, generator=self.generator) < self.rate
        value = torch.rand(x.shape, generator=self.generator)
        if self.binary:
            value = (value < 0.5).to(x.dtype)
        return torch.where(hit, value.to(x.dtype), x)


class Shift(Transform):
    """Whole-pixel translations uniform in [-shift, shift] along each axis, zero fill."""

    key, what = "shift", "shift"

    def __init__(self, generator: torch.Generator, image_shape, shift: int) -> None:
        super().__init__(generator)
        self.image_shape, self.shift = tuple(image_shape), shift

    def __call__(self, x: Tensor) -> Tensor:
        n, (h, w), s = x.shape[0], self.image_shape, self.shift
        padded = torch.nn.functional.pad(x.view(n, h, w), (s, s, s, s))
        offsets = torch.randint(0, 2 * s + 1, (2, n), generator=self.generator)
        rows = (offsets[0, :, None] + torch.arange(h))[:, :, None]
        cols = (offsets[1, :, None] + torch.arange(w))[:, None, :]
        return padded[torch.arange(n)[:, None, None], rows, cols].reshape(n, h * w)


class Affine(Transform):
    """A random affine map per image: a horizontal shear (slant) by an angle uniform in
    [-shear, shear] degrees, a rotation uniform in [-rotate, rotate] and a translation
    uniform in [-shift, shift] pixels, resampled with ``mode`` (bilinear, or nearest so
    that binary images stay binary)."""

    key, what = "affine", "affine"

    def __init__(
        self,
        generator: torch.Generator,
        image_shape,
        *,
        rotate: float,
        shear: float,
        shift: int,
        mode: str,
    ) -> None:
        super().__init__(generator)
        self.image_shape = tuple(image_shape)
        self.rotate, self.shear, self.shift, self.mode = rotate, shear, shift, mode

    def __call__(self, x: Tensor) -> Tensor:
        n, (h, w) = x.shape[0], self.image_shape
        u = 2 * torch.rand(4, n, generator=self.generator, dtype=torch.float64) - 1
        angle, slant = torch.deg2rad(self.rotate * u[0]), torch.deg2rad(self.shear * u[1])
        cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(slant)
        # M maps output pixel coordinates (x right, y down, about the centre) to input
        # ones: rotation times shear; theta is M in affine_grid's coordinates of [-1, 1].
        m = torch.stack(
            [torch.stack([cos, cos * tan - sin], -1), torch.stack([sin, sin * tan + cos], -1)], -2
        )
        half = torch.tensor([w / 2, h / 2], dtype=torch.float64)
        theta = torch.empty(n, 2, 3, dtype=torch.float64)
        theta[:, :, :2] = m * half[None, None, :] / half[None, :, None]
        theta[:, :, 2] = self.shift * u[2:].T / half
        grid = torch.nn.functional.affine_grid(theta.to(x.dtype), [n, 1, h, w], align_corners=False)
        out = torch.nn.functional.grid_sample(
            x.view(n, 1, h, w), grid, mode=self.mode, padding_mode="zeros", align_corners=False
        )
        return out.reshape(n, h * w)


class BatchLoader:
    """Minibatches of an in-memory ``Dataset`` as tuples ``(x,)`` or ``(x, y)``.

    Shuffling and dynamic binarisation (a fresh Bernoulli draw of each pixel every time an
    image is used) draw from their own ``torch.Generator``s, whose states ``state_dict``
    returns, so a resumed run replays the same batches.  Slicing tensors in memory avoids
    the per-item Python overhead of ``torch.utils.data.DataLoader`` for data this small.

    ``perturb`` > 0 replaces each pixel, with that probability and afresh every time an
    image is used, by a random value: a fair coin for binary images (dynamically binarised
    or already 0/1), uniform on [0, 1] otherwise.  This is how Ren et al. (2019, "Likelihood
    Ratios for Out-of-Distribution Detection") train the background model of their
    likelihood ratio; it has a generator of its own, so it changes no other draw.

    ``shift`` > 0 translates each image, afresh every time it is used, by a whole number of
    pixels drawn uniformly from [-shift, shift] along each axis, filling the uncovered
    border with 0 (before any binarisation).  ``rotate`` and ``shear`` > 0 (degrees) make
    it a random affine map instead: a horizontal shear (a change of slant) by an angle
    uniform in [-shear, shear] composed with a rotation by an angle uniform in [-rotate,
    rotate] and a translation uniform in [-shift, shift] pixels along each axis, resampled
    bilinearly before dynamic binarisation and to the nearest pixel otherwise (so binary
    images stay binary).  The semi-supervised model uses them on its few labelled images;
    each has a generator of its own.

    Each of these is a ``Transform`` (``Shift``/``Affine``, ``Binarize``, ``Perturb``),
    applied in that order (``self.transforms``) and saved in ``state_dict`` under its key.
    """

    def __init__(
        self,
        data: Dataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        binarize: str = "none",
        labels: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        stream: str = "train",
        device: torch.device | str = "cpu",
        perturb: float = 0.0,
        shift: int = 0,
        rotate: float = 0.0,
        shear: float = 0.0,
    ) -> None:
        if binarize not in BINARIZATIONS:
            raise DataError(f"unknown binarisation {binarize!r}; choose from {BINARIZATIONS}")
        if not isinstance(data, Dataset):
            raise DataError(f"data must be a Dataset (see as_dataset), got {type(data).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise DataError(f"batch size must be a positive integer, got {batch_size!r}")
        if labels and data.labels is None:
            raise DataError("labels were requested but the data set has none")
        if drop_last and len(data) < batch_size:
            raise DataError(f"{len(data)} images are fewer than one batch of {batch_size}")
        if not 0.0 <= perturb < 1.0:
            raise DataError(f"perturb is a probability in [0, 1), got {perturb}")
        if shift < 0:
            raise DataError(f"shift is a number of pixels, at least 0, got {shift}")
        for name, value, top in (("rotate", rotate, 180.0), ("shear", shear, 60.0)):
            if not 0.0 <= value <= top:
                raise DataError(f"{name} is an angle in degrees in [0, {top:g}], got {value}")
        if (shift or rotate or shear) and len(data.image_shape) != 2:
            raise DataError(
                f"shift, rotate and shear need images of two axes, not of shape {data.image_shape}"
            )
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.binarize = binarize
        self.labels = labels
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.perturb, self.shift = float(perturb), int(shift)
        self.rotate, self.shear = float(rotate), float(shear)
        # streams of their own, named after the loader's ``stream``
        self.shuffle_generator = generator(seed, f"{stream}-shuffle")
        # The binarisation stream is kept (and saved) also when it is not used, as it
        # always has been: saved loader states keep their keys.
        self.binarizer = Binarize(generator(seed, f"{stream}-binarize"))
        # applied in this order: geometry (before any binarisation), binarisation, noise
        self.transforms: list[Transform] = []
        if rotate or shear:
            self.transforms.append(
                Affine(
                    generator(seed, f"{stream}-affine"),
                    data.image_shape,
                    rotate=self.rotate,
                    shear=self.shear,
                    shift=self.shift,
                    mode="bilinear" if binarize == "dynamic" else "nearest",
                )
            )
        elif shift:
            self.transforms.append(
                Shift(generator(seed, f"{stream}-shift"), data.image_shape, shift)
            )
        if binarize == "dynamic":
            self.transforms.append(self.binarizer)
        if perturb:
            # which replacement values fit the images
            binary = binarize == "dynamic" or bool(((data.images == 0) | (data.images == 1)).all())
            self.transforms.append(Perturb(generator(seed, f"{stream}-perturb"), perturb, binary))
        # Where the current pass stands: the shuffle state it started from and how many
        # batches it has handed out, so that a pass stopped midway can be replayed exactly.
        self._epoch_shuffle_state = self.shuffle_generator.get_state()
        self._handed_out = 0
        self._resume_at = 0

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        if self._resume_at:
            self.shuffle_generator.set_state(self._epoch_shuffle_state)
        else:
            self._epoch_shuffle_state = self.shuffle_generator.get_state()
        start, self._resume_at = self._resume_at, 0
        n = len(self.data)
        order = torch.randperm(n, generator=self.shuffle_generator) if self.shuffle else None
        self._handed_out = start
        for b in range(start, len(self)):
            idx = slice(b * self.batch_size, (b + 1) * self.batch_size)
            if order is not None:
                idx = order[idx]
            x = self.data.images[idx]
            for transform in self.transforms:
                x = transform(x)
            x = x.to(self.device, non_blocking=True)
            self._handed_out = b + 1
            if self.labels:
                yield x, self.data.labels[idx].to(self.device, non_blocking=True)
            else:
                yield (x,)
        self._handed_out = 0

    def _streams(self) -> list[Transform]:
        return [self.binarizer, *(t for t in self.transforms if t is not self.binarizer)]

    def state_dict(self) -> dict[str, Any]:
        """Generator states and the position within the current pass (0 between passes)."""
        state = {
            "shuffle": self.shuffle_generator.get_state(),
            "epoch_shuffle": self._epoch_shuffle_state,
            "position": self._handed_out,
        }
        for transform in self._streams():
            state[transform.key] = transform.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state; the next pass continues after the batches already handed out."""
        self.shuffle_generator.set_state(state["shuffle"])
        for transform in self._streams():
            if transform.key not in state:
                raise DataError(f"the saved loader state has no {transform.what} stream")
            transform.load_state_dict(state[transform.key])
        self._epoch_shuffle_state = state["epoch_shuffle"]
        self._resume_at = int(state["position"])
        self._handed_out = self._resume_at


class SemiSupervisedLoader:
    """One pass over the unlabelled images as ``(x,)`` batches, with a labelled ``(x, y)``
    batch after every ``labelled_every`` of them, cycling through the labelled images.

    Both halves are ``BatchLoader``s with generators of their own; ``state_dict`` holds
    both, and the position within the pass, for exact resume.
    """

    def __init__(
        self,
        unlabelled: BatchLoader,
        labelled: BatchLoader,
        labelled_every: int = 1,
    ) -> None:
        if labelled_every < 1:
            raise DataError(f"labelled_every must be positive, got {labelled_every}")
        if not labelled.labels:
            raise DataError("the labelled loader must yield labels")
        if len(unlabelled) < labelled_every:
            raise DataError(
                f"no labelled batch would ever be drawn: a pass has {len(unlabelled)} unlabelled "
                f"batch(es) and a labelled one comes after every {labelled_every} "
                "(--labelled-every); lower it, or the batch size"
            )
        self.unlabelled, self.labelled, self.labelled_every = unlabelled, labelled, labelled_every
        self._labelled_iter: Iterator | None = None
        self._handed_out = 0
        self._resume_at = 0

    def __len__(self) -> int:
        n = len(self.unlabelled)
        return n + n // self.labelled_every

    def _next_labelled(self) -> tuple[Tensor, ...]:
        # The labelled images cycle: when a pass is used up (or a resumed pass has nothing
        # left), start the next one.
        for _ in range(3):
            if self._labelled_iter is not None:
                batch = next(self._labelled_iter, None)
                if batch is not None:
                    return batch
            self._labelled_iter = iter(self.labelled)
        raise DataError("the labelled loader yields no batches")

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        # Position p holds a labelled batch when (p + 1) is a multiple of labelled_every + 1.
        # After a resume both loaders continue from their own saved positions.
        start, self._resume_at = self._resume_at, 0
        unlabelled = iter(self.unlabelled)
        for position in range(start, len(self)):
            if (position + 1) % (self.labelled_every + 1) == 0:
                batch = self._next_labelled()
            else:
                batch = next(unlabelled)
            self._handed_out = position + 1
            yield batch
        next(unlabelled, None)  # let the unlabelled pass finish (and reset its position)
        self._handed_out = 0

    def state_dict(self) -> dict[str, Any]:
        """Both loaders' states and the position within the pass."""
        return {
            "unlabelled": self.unlabelled.state_dict(),
            "labelled": self.labelled.state_dict(),
            "position": self._handed_out,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore both loaders; the next pass continues where the saved one stood."""
        self.unlabelled.load_state_dict(state["unlabelled"])
        self.labelled.load_state_dict(state["labelled"])
        self._resume_at = int(state["position"])
        self._handed_out = self._resume_at
        self._labelled_iter = None
