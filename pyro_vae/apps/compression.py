"""Lossless compression of images with a trained VAE: bits-back coding with ANS.

Bits-back coding (Frey & Hinton 1997; Townsend, Bird & Barber 2019, "BB-ANS") turns the VAE
into a code whose length per image is -log p(x|z) - log p(z) + log q(z|x) for a z drawn
from q(z|x): on average the negative ELBO.  For each image, on a stack of bits:

1. *decode* z from the stack with q(z|x) (this takes -log q(z|x) bits off the stack);
2. encode x with p(x|z);
3. encode z with the prior p(z).

Decoding runs the steps backwards and, re-encoding z with q(z|x), gives the bits of step 1
back: the message for the next image was built on them.  The entropy coder is the ANS stack
coder of ``constriction`` (a well-kept Rust library with Python bindings); this module only
chooses the models.

The latent is discretised into ``2**latent_bits`` buckets per dimension of equal prior mass
(edges at the standard normal's quantiles), so that the prior costs exactly ``latent_bits``
bits per dimension and q(z|x) becomes a categorical over the same buckets (differences of
its CDF at the edges); the decoder sees each bucket's prior median.  The default, 10 bits,
makes a bucket near the origin 0.0024 wide, about 1/40 of a typical posterior standard
deviation; the README's measurement shows the code length of 8 to 14 bits within 0.1% of each
other and of the continuous -ELBO, while the time grows with the 2**bits probabilities each
latent dimension's table holds.

The first image of a message is coded without bits back (its z is the median bucket of
q(z|x)): the stack is empty, and popping from an empty stack would draw z from its junk
state, far out in q's tails.  That costs about ``z_dim * latent_bits`` bits once per
message, the clean-start overhead, reported separately by the benchmark.

**Importance-weighted bits-back (BB-IS; Ruan et al. 2021, "Improving lossless compression
rates via Monte Carlo bits-back coding").**  With ``particles`` K > 1 the latent space is
extended to (j, z_1..z_K): the coder pops K latents from q(z|x) and an index j from the
normalised importance weights w~_j = w_j / sum_k w_k (w_k = p(x, z_k) / q(z_k|x)), then pushes
the other K - 1 latents back with q(z|x), x with p(x|z_j), z_j with the prior and j with a
uniform 1/K.  Net, the message grows by -log p(x, z_j) + log q(z_j|x) + log K + log w~_j =
-log (sum_k w_k / K) = -log p̂_K(x): the importance-weighted estimate's code length, which
approaches -log p(x) as K grows, instead of the ELBO's.  The decoder runs the steps backwards
and, knowing x and every z_k, recomputes w~ and gets the popped bits back.  K = 1 is the
plain coder above, byte for byte.  The first image pays its K latents in full once.

**Several stochastic layers** (``HierarchicalVAE``, one particle): the layers are chained.
The coder pops every layer from the guide in the guide's order, pushes x with p(x | z_1),
each z_l with p(z_l | z_{l+1}) and z_L with its prior; decoding runs it backwards.  Each
layer's buckets are the standard normal's moved and stretched per dimension: under the
top-down guide, to p(z_l | z_{l+1}) at the layer above (known when z_l is coded, so its prior
costs exactly ``latent_bits`` per dimension); under the bottom-up guide, which draws z_1
first, to the model's marginal of z_l (see ``_marginal_grids``).  The rate approaches the
-ELBO as for one layer; the first image pays its layers' prior cost in full, once.

**Pixels**: binary images are coded with the model's Bernoulli p(x|z); grey images of a
model with the discretised logistic likelihood (8-bit: 256 levels) with the categorical of
its level probabilities per pixel, so that the code length is the same -log p(x|z) in bits
(one stochastic layer; grey (H, W) or colour (H, W, C) images, each value one symbol).

The networks run in float64 on one thread, so that encoder and decoder compute the same
probability tables bit for bit: decode with the same weights (checked through a hash in the
file header) and the same library versions.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["FORMAT_VERSION", "BitsBackCoder", "CompressedImages", "CompressionError", "model_hash"]

FORMAT_VERSION = 3
MAGIC = b"PYROVAE-BB"
# magic, format version, weights hash, image count, height, width, latent bits, payload
# words, then a CRC-32 of all of that and the payload; all little-endian.  Version 1 (one
# particle) is still written for K = 1, so that its files are those of earlier releases;
# version 2 adds the particle count K after the latent bits; version 3 (images with
# channels, (H, W, C), the only ones it is written for) the channel count after K.
_HEADER = struct.Struct("<10sH32sIHHBI")
_HEADER_V2 = struct.Struct("<10sH32sIHHBHI")
_HEADER_V3 = struct.Struct("<10sH32sIHHBHBI")
_HEADERS = {1: _HEADER, 2: _HEADER_V2, 3: _HEADER_V3}
MAX_PARTICLES = 1024
_CRC = struct.Struct("<I")
# images whose posterior tables are computed at once (64 x 50 x 4096 float64: 100 MB at 12 bits)
_CHUNK = 64


class CompressionError(ValueError):
    """A file that cannot be decoded with this model: other weights, truncated, altered."""


def _constriction():
    try:
        from constriction import stream
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CompressionError(f"the entropy coder needs constriction: {e}") from None
    return stream


def model_hash(model: torch.nn.Module) -> bytes:
    """sha256 of the model's configuration and weights (32 bytes): a file made with other
    weights is refused instead of decoding into garbage."""
    h = hashlib.sha256()
    config = model.config() if hasattr(model, "config") else {}
    h.update(json.dumps(config, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.digest()


@dataclass
class CompressedImages:
    """A compressed sequence of images: the coder's words and what is needed to check them."""

    words: np.ndarray  # uint32
    count: int
    image_shape: tuple[int, ...]  # (H, W), or (H, W, C) for images with channels
    latent_bits: int
    weights: bytes
    particles: int = 1

    @property
    def num_bits(self) -> int:
        """The message's length in bits (the payload, without the header)."""
        return 32 * len(self.words)

    def to_bytes(self) -> bytes:
        """The file's bytes: header (format version, weights hash, image count and shape,
        latent bits, particles, channels), message, CRC."""
        if len(self.image_shape) == 3:
            h, w, c = self.image_shape
            header = _HEADER_V3.pack(
                MAGIC, 3, self.weights, self.count, h, w, self.latent_bits, self.particles, c,
                len(self.words),
            )  # fmt: skip
        elif self.particles == 1:  # the one-particle format of earlier releases
            header = _HEADER.pack(
                MAGIC,
                1,
                self.weights,
                self.count,
                *self.image_shape,
                self.latent_bits,
                len(self.words),
            )
        else:
            header = _HEADER_V2.pack(
                MAGIC,
                2,
                self.weights,
                self.count,
                *self.image_shape,
                self.latent_bits,
                self.particles,
                len(self.words),
            )
        payload = self.words.astype("<u4").tobytes()
        return header + _CRC.pack(zlib.crc32(header + payload)) + payload

    @classmethod
    def from_bytes(cls, data: bytes) -> CompressedImages:
        """Read a file's bytes; ``CompressionError`` (one line) for a truncated, altered or foreign file."""
        if len(data) < _HEADER.size + _CRC.size or not data.startswith(MAGIC):
            raise CompressionError("not a pyro-vae compressed file (no header)")
        (version,) = struct.unpack_from("<H", data, len(MAGIC))
        header = _HEADERS.get(version)
        if header is None:
            supported = ", ".join(map(str, _HEADERS))
            raise CompressionError(
                f"format version {version} is not one of the supported {supported}"
            )
        if len(data) < header.size + _CRC.size:
            raise CompressionError(
                f"truncated: {len(data)} bytes, shorter than a version {version} header"
            )
        particles, channels = 1, 0
        if version == 1:
            magic, version, weights, count, h, w, bits, n_words = header.unpack_from(data)
        elif version == 2:
            magic, version, weights, count, h, w, bits, particles, n_words = header.unpack_from(
                data
            )
        else:
            fields = header.unpack_from(data)
            magic, version, weights, count, h, w, bits, particles, channels, n_words = fields
        start = header.size + _CRC.size
        (crc,) = _CRC.unpack_from(data, header.size)
        payload = data[start:]
        if len(payload) != 4 * n_words:
            raise CompressionError(
                f"truncated or padded: {len(payload)} payload bytes, the header says {4 * n_words}"
            )
        if zlib.crc32(data[: header.size] + payload) != crc:
            raise CompressionError("the file does not match its checksum: it was altered")
        if not 1 <= bits <= 16 or h * w == 0 or not 1 <= particles <= MAX_PARTICLES:
            raise CompressionError("the header is invalid")
        if version == 3 and channels == 0:
            raise CompressionError("the header is invalid")
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
        shape = (h, w, channels) if version == 3 else (h, w)
        return cls(words, count, shape, bits, weights, particles)


class BitsBackCoder:
    """Bits-back coding of binary images with a VAE (Bernoulli likelihood, standard normal
    prior, diagonal Gaussian guide: the project's ``VAE``, or a ``HierarchicalVAE`` with one
    particle).  ``encode`` and ``decode`` are exact inverses; ``information`` gives the code
    length each image should cost, in bits."""

    def __init__(self, vae, latent_bits: int = 10, particles: int = 1) -> None:
        likelihood = getattr(vae, "likelihood_name", None)
        if likelihood not in ("bernoulli", "logistic"):
            raise ValueError(
                "bits-back coding here needs a VAE with a Bernoulli or a discretised logistic "
                "likelihood (a discrete p(x|z))"
            )
        if len(tuple(vae.image_shape)) not in (2, 3):
            raise ValueError(
                "bits-back coding here takes images, (H, W) or (H, W, C), not vectors of "
                f"shape {tuple(vae.image_shape)}"
            )
        # None: binary pixels; else the grey levels of the discretised logistic
        self.levels = vae.levels if likelihood == "logistic" else None
        if getattr(vae, "flow", None) or getattr(vae, "covariance", "diagonal") != "diagonal":
            # the coder draws each latent dimension from its own factor of q(z|x)
            raise ValueError("bits-back coding here needs the diagonal Gaussian guide")
        self.layers = len(getattr(vae, "latent_sites", ("z",)))
        if self.layers > 1 and particles != 1:
            raise ValueError(
                "importance-weighted bits-back (--particles > 1) takes a one-layer VAE; a "
                "hierarchical model is coded with one particle"
            )
        if not 4 <= latent_bits <= 16:
            raise ValueError(f"latent_bits must be between 4 and 16, got {latent_bits}")
        if not 1 <= particles <= MAX_PARTICLES:
            raise ValueError(f"particles must be between 1 and {MAX_PARTICLES}, got {particles}")
        self.vae = vae
        self.particles = particles
        self.latent_bits = latent_bits
        self.buckets = 1 << latent_bits
        u = torch.arange(self.buckets + 1, dtype=torch.float64) / self.buckets
        self.edges = torch.special.ndtri(u)  # -inf ... +inf
        self.centres = torch.special.ndtri(
            (torch.arange(self.buckets, dtype=torch.float64) + 0.5) / self.buckets
        )
        self.weights = model_hash(vae)
        self._stream = _constriction()
        # how this latent structure is coded: one small scheme per structure
        scheme = _Layers if self.layers > 1 else _Particles if particles > 1 else _OneLayer
        self._scheme = scheme(self)

    # -- the three models, in float64 on one thread ---------------------------------------

    def _posterior_tables(self, nets, x: Tensor) -> np.ndarray:
        """q(bucket | x): (N, z_dim, buckets) probabilities."""
        loc, scale = nets.encode(x)
        cdf = torch.special.ndtr((self.edges - loc[..., None]) / scale[..., None])
        return (cdf[..., 1:] - cdf[..., :-1]).clamp_min(0).numpy()

    def _pixel_probs(self, nets, buckets: np.ndarray) -> np.ndarray:
        """p(x | z = bucket medians): binary pixels P(x_d = 1) (N, pixels); grey pixels the
        probability of every level (N, pixels, levels)."""
        z = self.centres[torch.as_tensor(buckets, dtype=torch.long)]
        if self.levels is None:
            return torch.sigmoid(nets.decode(z)).numpy()
        return nets.net.likelihood(z).level_probs().numpy()

    # -- pixels: binary with p(x_d = 1), or grey levels with their categorical ------------

    def _pixel_symbols(self, x: Tensor | np.ndarray) -> np.ndarray:
        """An image's pixels as the coder's symbols: 0/1, or the level 0..levels-1."""
        x = np.asarray(x, dtype=np.float64)
        steps = 1 if self.levels is None else self.levels - 1
        return np.rint(x * steps).astype(np.int32)

    def _encode_pixels(self, coder, x: Tensor | np.ndarray, probs: np.ndarray) -> None:
        model = self._pixel_model()
        coder.encode_reverse(self._pixel_symbols(x), model, probs)

    def _decode_pixels(self, coder, probs: np.ndarray) -> np.ndarray:
        """One image's pixels off the stack, as values in [0, 1] (float32)."""
        symbols = coder.decode(self._pixel_model(), probs)
        steps = 1 if self.levels is None else self.levels - 1
        return symbols.astype(np.float32) / np.float32(steps)  # as ``check_images`` makes them

    def _pixel_model(self):
        m = self._stream.model
        return m.Bernoulli(perfect=False) if self.levels is None else m.Categorical(perfect=False)

    def _log_px(self, x: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """log p(x | z) of one image under K pixel tables (K, pixels[, levels]), nats: (K,)."""
        if self.levels is None:
            return np.where(x > 0.5, np.log(probs), np.log1p(-probs)).sum(-1)
        symbols = self._pixel_symbols(x)
        picked = np.take_along_axis(probs, symbols[None, :, None], axis=-1)[..., 0]
        return np.log(picked.clip(min=2.0**-24)).sum(-1)

    # -- the pieces every scheme shares ---------------------------------------------------

    @staticmethod
    def _first_buckets(table: np.ndarray) -> np.ndarray:
        """The first image's z: the bucket holding the median of q(z|x), per dimension.  It
        is coded without bits back (the stack is empty), so this costs the prior's bits in
        full once per message: the "initial bits" of bits-back coding, without the random
        bits a stack would otherwise have to be seeded with."""
        return (table.cumsum(-1) < 0.5 * table.sum(-1, keepdims=True)).sum(-1).astype(np.int32)

    def _models(self):
        m = self._stream.model
        return m.Categorical(perfect=False), m.Bernoulli(perfect=False), m.Uniform(self.buckets)

    def _log_weights(self, nets, x: np.ndarray, z: np.ndarray, table: np.ndarray) -> np.ndarray:
        """log w_k = log p(x | z_k) + log P(z_k) - log Q(z_k | x) of the discretised model
        for K buckets z (K, z_dim) of one image x (pixels), natural log: (K,)."""
        log_px = self._log_px(x, self._pixel_probs(nets, z))
        normalised = table / table.sum(-1, keepdims=True)
        # the coder gives every bucket at least its smallest probability, 2**-24
        q = normalised[np.arange(z.shape[1]), z].clip(min=2.0**-24)
        return log_px - z.shape[1] * self.latent_bits * math.log(2) - np.log(q).sum(-1)

    @staticmethod
    def _index_probs(log_w: np.ndarray) -> np.ndarray:
        """The normalised importance weights w~ (K,) from log weights, float64."""
        w = np.exp(log_w - log_w.max())
        return w / w.sum()

    def _message(self, coder, count: int) -> CompressedImages:
        return CompressedImages(
            coder.get_compressed().astype(np.uint32),
            count,
            tuple(self.vae.image_shape),
            self.latent_bits,
            self.weights,
            self.particles,
        )

    # -- coding: each call goes to the scheme of the model's latent structure -------------

    def encode(self, images: Tensor, trace: list | None = None) -> CompressedImages:
        """Compress binary images (N, H*W) into one message.  With a list as ``trace``,
        appends (message length in bits, buckets of z) after each image (with K > 1 the
        buckets of all K particles, (K, z_dim), and the chosen index; with several layers a
        tuple of buckets, layer 1 first)."""
        return self._scheme.encode(self.check_images(images), trace)

    def decode(self, message: CompressedImages) -> Tensor:
        """The images of ``message``, (N, H*W) float32: 0/1, or grey levels k / (levels - 1); raises
        ``CompressionError`` for a message made with other weights or that does not decode."""
        if message.weights != self.weights:
            raise CompressionError("the file was made with other model weights")
        if message.latent_bits != self.latent_bits:
            raise CompressionError(
                f"the file uses {message.latent_bits} latent bits, this coder {self.latent_bits}"
            )
        if tuple(message.image_shape) != tuple(self.vae.image_shape):
            raise CompressionError(f"the file holds {message.image_shape} images")
        if message.particles != self.particles:
            raise CompressionError(
                f"the file uses {message.particles} particles, this coder {self.particles}"
            )
        try:
            return self._scheme.decode(message)
        except CompressionError:
            raise
        except (ValueError, IndexError) as e:  # a corrupt message can fail inside the coder
            raise CompressionError(f"the message does not decode: {e}") from None

    def information(
        self, images: Tensor, buckets: np.ndarray | None = None, seed: int = 0
    ) -> np.ndarray:
        """The code length each image should cost, in bits: ``-log2 p(x|ẑ) - log2 P(ẑ) +
        log2 Q(ẑ|x)`` for the latent buckets ẑ (N, z_dim) with one particle, and
        ``-log2 (mean_k w_k)`` for K particles (N, K, z_dim), the importance-weighted
        estimate's; by default ẑ is drawn from ``Q(·|x)``.  Its mean over draws is the
        discretised model's -ELBO (K = 1) or -log p̂_K(x) (K > 1), in bits."""
        return self._scheme.information(self.check_images(images), buckets, seed)

    def check_images(self, images: Tensor) -> Tensor:
        """The images as the coder takes them: (N, pixels) float64 on the CPU, grey levels
        on the float32 grid k / (levels - 1); a ``ValueError`` for pixels the model cannot
        code."""
        x = torch.as_tensor(images)
        x = x.reshape(len(x), x[0].numel() if len(x) else self.vae.x_dim).double().cpu()
        if x.shape[1] != self.vae.x_dim:
            raise ValueError(f"images have {x.shape[1]} pixels, the model {self.vae.x_dim}")
        if self.levels is None:
            if not ((x == 0) | (x == 1)).all():
                raise ValueError("the model's pixels are binary: the images must be 0/1 values")
            return x
        steps = self.levels - 1
        # float32 values k / steps sit within about 1e-5 steps of the grid
        if not ((x >= 0) & (x <= 1) & ((x * steps - (x * steps).round()).abs() < 1e-3)).all():
            raise ValueError(
                f"the model's pixels have {self.levels} levels: the images must be values "
                f"k / {steps} in [0, 1]"
            )
        # each level as the float32 value k / steps (what the data loader gives the model and
        # what the decoder rebuilds), so that both sides compute the same posterior tables
        return (torch.round(x * steps).float() / steps).double()


class _Scheme:
    """How one latent structure is coded: ``encode`` (checked images) -> message, ``decode``
    (a message whose header fits) -> images, ``information`` -> bits per image.  A scheme
    reads the coder's shared pieces (its float64 networks, buckets and the file header)."""

    def __init__(self, shared: BitsBackCoder) -> None:
        self.shared = shared  # the coder whose networks, buckets and header the scheme uses

    def encode(self, x: Tensor, trace: list | None) -> CompressedImages:
        raise NotImplementedError

    def decode(self, message: CompressedImages) -> Tensor:
        raise NotImplementedError

    def information(self, x: Tensor, buckets, seed: int) -> np.ndarray:
        raise NotImplementedError


class _OneLayer(_Scheme):
    """One stochastic layer, one particle: pop z from Q(z|x), push x with p(x|z) and z with
    its uniform prior buckets (the format of the first release)."""

    def encode(self, x: Tensor, trace: list | None) -> CompressedImages:
        c = self.shared
        categorical, bernoulli, uniform = c._models()
        coder = c._stream.stack.AnsCoder()
        with _Float64Networks(c.vae) as nets:
            for start in range(0, x.shape[0], _CHUNK):
                tables = c._posterior_tables(nets, x[start : start + _CHUNK])
                for i in range(start, min(start + _CHUNK, x.shape[0])):
                    if i == 0:  # clean start: nothing to take bits from yet
                        z = c._first_buckets(tables[0])
                    else:
                        z = coder.decode(categorical, tables[i - start])
                    probs = c._pixel_probs(nets, z[None])[0]
                    c._encode_pixels(coder, x[i].numpy(), probs)
                    coder.encode_reverse(z, uniform)
                    if trace is not None:
                        trace.append((coder.num_valid_bits(), z))
        return c._message(coder, x.shape[0])

    def decode(self, message: CompressedImages) -> Tensor:
        c = self.shared
        categorical, bernoulli, uniform = c._models()
        coder = c._stream.stack.AnsCoder(message.words.copy())
        out = np.empty((message.count, c.vae.x_dim), dtype=np.float32)
        with _Float64Networks(c.vae) as nets:
            for i in reversed(range(message.count)):
                z = coder.decode(uniform, c.vae.z_dim)
                probs = c._pixel_probs(nets, z[None])[0]
                x = c._decode_pixels(coder, probs)
                out[i] = x
                x64 = torch.as_tensor(x[None], dtype=torch.float64)
                table = c._posterior_tables(nets, x64)[0]
                if i > 0:
                    coder.encode_reverse(z, categorical, table)  # the bits back
                elif not np.array_equal(z, c._first_buckets(table)):
                    raise CompressionError("the first image does not decode consistently")
        if not coder.is_empty():
            raise CompressionError("the message does not decode to the images it claims to hold")
        return torch.from_numpy(out)

    def information(self, x: Tensor, buckets, seed: int) -> np.ndarray:
        """-log2 of the mean weight of the K = ``particles`` buckets of each image (bits)."""
        c = self.shared
        k = c.particles
        out = np.empty(x.shape[0])
        gen = np.random.default_rng(seed)
        with _Float64Networks(c.vae) as nets:
            for start in range(0, x.shape[0], _CHUNK):
                xs = x[start : start + _CHUNK]
                tables = c._posterior_tables(nets, xs)
                tables = tables / tables.sum(-1, keepdims=True)
                for n in range(len(xs)):
                    if buckets is None:
                        u = gen.random((k, tables.shape[1], 1))
                        z = (tables[n].cumsum(-1) < u).sum(-1).clip(max=c.buckets - 1)
                    else:
                        z = np.asarray(buckets[start + n]).reshape(k, -1)
                    log_w = c._log_weights(nets, xs[n].numpy(), z, tables[n])
                    top = log_w.max()
                    log_mean = top + math.log(np.exp(log_w - top).mean())
                    out[start + n] = -log_mean / math.log(2)
        return out


class _Particles(_OneLayer):
    """One stochastic layer, K > 1 particles (BB-IS, see the module docstring); the
    information is the one-layer scheme's, which takes any K."""

    def encode(self, x: Tensor, trace: list | None) -> CompressedImages:
        """BB-IS (see the module docstring) for K = the coder's ``particles`` > 1."""
        c = self.shared
        k = c.particles
        categorical, bernoulli, uniform = c._models()
        index_uniform = c._stream.model.Uniform(k)
        coder = c._stream.stack.AnsCoder()
        with _Float64Networks(c.vae) as nets:
            for start in range(0, x.shape[0], _CHUNK):
                tables = c._posterior_tables(nets, x[start : start + _CHUNK])
                for i in range(start, min(start + _CHUNK, x.shape[0])):
                    table = tables[i - start]
                    repeated = np.repeat(table[None], k, axis=0).reshape(-1, c.buckets)
                    if i == 0:  # clean start: nothing to take bits from yet
                        z = np.repeat(c._first_buckets(table)[None], k, axis=0)
                        j = 0
                    else:
                        z = coder.decode(categorical, repeated).reshape(k, -1)
                        probs_j = c._index_probs(c._log_weights(nets, x[i].numpy(), z, table))
                        j = int(coder.decode(categorical, probs_j[None])[0])
                    others = np.delete(np.arange(k), j)
                    coder.encode_reverse(
                        z[others].reshape(-1), categorical, repeated[: (k - 1) * z.shape[1]]
                    )
                    probs = c._pixel_probs(nets, z[j][None])[0]
                    c._encode_pixels(coder, x[i].numpy(), probs)
                    coder.encode_reverse(z[j], uniform)
                    coder.encode_reverse(np.array([j], dtype=np.int32), index_uniform)
                    if trace is not None:
                        trace.append((coder.num_valid_bits(), z, j))
        return c._message(coder, x.shape[0])

    def decode(self, message: CompressedImages) -> Tensor:
        c = self.shared
        k = c.particles
        categorical, bernoulli, uniform = c._models()
        index_uniform = c._stream.model.Uniform(k)
        coder = c._stream.stack.AnsCoder(message.words.copy())
        out = np.empty((message.count, c.vae.x_dim), dtype=np.float32)
        with _Float64Networks(c.vae) as nets:
            for i in reversed(range(message.count)):
                j = int(coder.decode(index_uniform, 1)[0])
                z_j = coder.decode(uniform, c.vae.z_dim)
                probs = c._pixel_probs(nets, z_j[None])[0]
                x = c._decode_pixels(coder, probs)
                out[i] = x
                table = c._posterior_tables(nets, torch.as_tensor(x[None], dtype=torch.float64))[0]
                repeated = np.repeat(table[None], k, axis=0).reshape(-1, c.buckets)
                others = coder.decode(categorical, repeated[: (k - 1) * len(z_j)])
                z = np.insert(others.reshape(k - 1, -1), j, z_j, axis=0)
                if i > 0:  # the bits back: the index, then the K latents
                    probs_j = c._index_probs(c._log_weights(nets, x, z, table))
                    coder.encode_reverse(np.array([j], dtype=np.int32), categorical, probs_j[None])
                    coder.encode_reverse(z.reshape(-1), categorical, repeated)
                elif j != 0 or not (z == c._first_buckets(table)[None]).all():
                    raise CompressionError("the first image does not decode consistently")
        if not coder.is_empty():
            raise CompressionError("the message does not decode to the images it claims to hold")
        return torch.from_numpy(out)


class _Layers(_Scheme):
    """Several stochastic layers (``HierarchicalVAE``), one particle."""

    #    # The layers are chained: for each image the coder pops every layer from the guide, in
    # the guide's order (z_1 first for the bottom-up guide, z_L first for the top-down one),
    # each given the layers already popped; then pushes x with p(x | z_1), each z_l with
    # p(z_l | z_{l+1}) and z_L with its uniform prior buckets.  Decoding pops the model's
    # order from the top and pushes the guide's layers back in reverse.  Tables are computed
    # one image at a time on both sides, so that encoder and decoder run identical products.
    #
    # Each layer's buckets are the standard normal's equal-mass buckets moved and stretched
    # per dimension, a + b * (standard edges):
    # - the top layer: a = 0, b = 1 (its prior);
    # - a layer below the top, top-down or deterministic guide (both drawn from the top down
    #   here; the deterministic guide's layers do not depend on each other): a, b = the mean
    #   and scale of p(z_l | z_{l+1})
    #   at the layer above's value, known to both sides when z_l is coded (the guide draws
    #   from the top), so the prior costs exactly ``latent_bits`` per dimension and the buckets
    #   follow the conditional however narrow it is (the dynamic discretisation of Townsend
    #   et al. 2020, "HiLLoC");
    # - a layer below the top, bottom-up guide: q(z_1 | x) is popped before z_2 is known, so
    #   the buckets are fixed: a, b = mean and standard deviation of the model's marginal of
    #   z_l, from the layer above at 4,096 unscrambled Sobol points of its prior (deterministic:
    #   both sides compute the same grid; deeper layers follow the conditional means).
    # P and Q are then differences of Gaussian CDFs at the same edges, so the bucket widths
    # cancel in the code length, which approaches -ELBO as for one layer.

    def __init__(self, shared: BitsBackCoder) -> None:
        super().__init__(shared)
        self.vae, self.layers, self.latent_bits = shared.vae, shared.layers, shared.latent_bits
        self.buckets, self.edges, self.centres = shared.buckets, shared.edges, shared.centres
        self._stream = shared._stream
        self._static = None  # a bottom-up model's fixed buckets, once computed

    def _guide_order(self) -> list[int]:
        """0-based layers in the order the guide draws them."""
        up = list(range(self.layers))
        return up if self.vae.guide_kind == "bottom-up" else up[::-1]

    def _marginal_grids(self, net) -> dict[int, tuple[Tensor, Tensor]]:
        """(a, b) per layer below the top for the bottom-up guide (see above)."""
        top = self.layers - 1
        engine = torch.quasirandom.SobolEngine(self.vae.z_dims[top], scramble=False)
        u = engine.draw(4097, dtype=torch.float64)[1:]  # the first point is the origin, u = 0
        z = {top + 1: torch.special.ndtri(u)}  # 1-based, as the model's ``context`` keys them
        grids = {}
        for layer in range(top - 1, -1, -1):
            loc, scale = net.conditionals[layer](net.context(layer + 1, z))
            mean = loc.mean(0)
            var = (scale.square() + loc.square()).mean(0) - mean.square()
            grids[layer] = (mean, var.clamp_min(1e-12).sqrt())
            z[layer + 1] = loc
        return grids

    @staticmethod
    def _above(net, layer: int, values: dict) -> Tensor:
        """What the generative network of 0-based ``layer`` (-1: p(x | ...)) reads, one row,
        from the coded ``values`` (keyed by 0-based layer)."""
        return net.context(layer + 1, {k + 1: v[None] for k, v in values.items()})

    def _grid(self, net, layer: int, values: dict) -> tuple[Tensor, Tensor]:
        """(a, b): layer's buckets are a + b * (the standard normal's), (d_layer,) each."""
        if layer == self.layers - 1:
            return torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
        if net.guide_kind == "bottom-up":
            if self._static is None:  # once per coder, from the float64 networks
                self._static = self._marginal_grids(net)
            return self._static[layer]
        p = net.conditional(layer + 1, self._above(net, layer, values)).base_dist
        return p.loc[0], p.scale[0]

    def _table(self, grid: tuple[Tensor, Tensor], loc: Tensor, scale: Tensor) -> np.ndarray:
        """Bucket probabilities of N(loc, scale) (d,) on ``grid``: (d, buckets)."""
        a, b = grid
        edges = a[..., None] + b[..., None] * self.edges  # +-inf stay +-inf (b > 0)
        cdf = torch.special.ndtr((edges - loc[..., None]) / scale[..., None])
        return (cdf[..., 1:] - cdf[..., :-1]).clamp_min(0).numpy()

    def _set(self, layer: int, bucket: np.ndarray, grid, z: dict, values: dict, grids: dict):
        """Record layer's buckets, its grid and the value each bucket stands for (the grid's
        bucket median)."""
        grids[layer] = a, b = grid
        z[layer] = bucket
        values[layer] = a + b * self.centres[torch.as_tensor(bucket, dtype=torch.long)]

    def _guide_table(self, net, x: Tensor, estimates, layer: int, values: dict, grid):
        """Q(z_layer | x, the layers the guide drew before it) on ``grid``: (d, buckets)."""
        if net.guide_kind == "bottom-up":
            h = x if layer == 0 else values[layer - 1][None]
            loc, scale = net.encoders[layer](h)
        elif layer == self.layers - 1 or net.guide_kind == "deterministic":
            loc, scale = estimates[layer]
        else:
            q = net.merged(layer + 1, estimates[layer], self._above(net, layer, values)).base_dist
            loc, scale = q.loc, q.scale
        return self._table(grid, loc[0], scale[0])

    def _prior_table(self, net, layer: int, values: dict, grid) -> np.ndarray | None:
        """P(z_layer | z_{layer+1}) below the top on ``grid``, (d, buckets); None where the
        grid is the conditional's own (top-down and deterministic guides): uniform buckets."""
        if net.guide_kind != "bottom-up":
            return None
        p = net.conditional(layer + 1, self._above(net, layer, values)).base_dist
        return self._table(grid, p.loc[0], p.scale[0])

    def _guide_pass(self, net, x: Tensor, pick) -> tuple[dict, dict, dict, dict]:
        """Every layer in the guide's order, ``pick(layer, table)`` choosing its buckets:
        (buckets, values, grids, guide tables), keyed by 0-based layer."""
        estimates = net.estimates(x) if net.guide_kind != "bottom-up" else None
        z, values, grids, tables = {}, {}, {}, {}
        for layer in self._guide_order():
            grid = self._grid(net, layer, values)
            tables[layer] = self._guide_table(net, x, estimates, layer, values, grid)
            self._set(layer, pick(layer, tables[layer]), grid, z, values, grids)
        return z, values, grids, tables

    def _pixels(self, net, values: dict) -> np.ndarray:
        return torch.sigmoid(net.decoder(self._above(net, -1, values)))[0].numpy()

    def encode(self, x: Tensor, trace: list | None) -> CompressedImages:
        categorical, bernoulli, uniform = self.shared._models()
        coder = self._stream.stack.AnsCoder()
        top = self.layers - 1
        with _Float64Networks(self.vae) as nets:
            net = nets.net
            for i in range(x.shape[0]):
                if i == 0:  # clean start: nothing to take bits from yet
                    pick = lambda layer, table: self.shared._first_buckets(table)  # noqa: E731
                else:
                    pick = lambda layer, table: coder.decode(categorical, table)  # noqa: E731
                z, values, grids, _ = self._guide_pass(net, x[i : i + 1], pick)
                coder.encode_reverse(
                    x[i].numpy().astype(np.int32), bernoulli, self._pixels(net, values)
                )
                for layer in range(top):
                    table = self._prior_table(net, layer, values, grids[layer])
                    if table is None:
                        coder.encode_reverse(z[layer], uniform)
                    else:
                        coder.encode_reverse(z[layer], categorical, table)
                coder.encode_reverse(z[top], uniform)
                if trace is not None:
                    trace.append((coder.num_valid_bits(), tuple(z[n] for n in range(self.layers))))
        return self.shared._message(coder, x.shape[0])

    def decode(self, message: CompressedImages) -> Tensor:
        categorical, bernoulli, uniform = self.shared._models()
        coder = self._stream.stack.AnsCoder(message.words.copy())
        out = np.empty((message.count, self.vae.x_dim), dtype=np.float32)
        top = self.layers - 1
        with _Float64Networks(self.vae) as nets:
            net = nets.net
            for i in reversed(range(message.count)):
                z, values, grids = {}, {}, {}
                bucket = coder.decode(uniform, self.vae.z_dims[top])
                self._set(top, bucket, self._grid(net, top, values), z, values, grids)
                for layer in range(top - 1, -1, -1):
                    grid = self._grid(net, layer, values)
                    table = self._prior_table(net, layer, values, grid)
                    if table is None:
                        bucket = coder.decode(uniform, self.vae.z_dims[layer])
                    else:
                        bucket = coder.decode(categorical, table)
                    self._set(layer, bucket, grid, z, values, grids)
                x = coder.decode(bernoulli, self._pixels(net, values))
                out[i] = x
                xi = torch.as_tensor(x[None], dtype=torch.float64)
                if i > 0:
                    # the guide's tables at the decoded buckets; then the bits back, in the
                    # reverse of the order they were taken
                    tables = self._guide_pass(net, xi, lambda n, table, z=z: z[n])[3]
                    for layer in reversed(self._guide_order()):
                        coder.encode_reverse(z[layer], categorical, tables[layer])
                else:
                    first = self._guide_pass(
                        net, xi, lambda n, table: self.shared._first_buckets(table)
                    )
                    if any(not np.array_equal(first[0][n], z[n]) for n in z):
                        raise CompressionError("the first image does not decode consistently")
        if not coder.is_empty():
            raise CompressionError("the message does not decode to the images it claims to hold")
        return torch.from_numpy(out)

    def information(self, x: Tensor, buckets, seed: int) -> np.ndarray:
        """``information`` for several layers: -log2 p(x | ẑ_1) - sum_l log2 P(ẑ_l | ẑ_{l+1})
        - log2 P(ẑ_L) + sum_l log2 Q(ẑ_l | ...), bits, for ``buckets`` (per image, a tuple of
        arrays, layer 1 first) or draws from the discretised guide."""
        gen = np.random.default_rng(seed)
        out = np.empty(x.shape[0])
        top = self.layers - 1

        def pick(i):
            def draw(layer, table):
                if buckets is not None:
                    return np.asarray(buckets[i][layer])
                normalised = table / table.sum(-1, keepdims=True)
                u = gen.random((table.shape[0], 1))
                return (normalised.cumsum(-1) < u).sum(-1).clip(max=self.buckets - 1)

            return draw

        with _Float64Networks(self.vae) as nets:
            net = nets.net
            for i in range(x.shape[0]):
                xi = x[i : i + 1]
                z, values, grids, tables = self._guide_pass(net, xi, pick(i))
                log_w = sum(-_log_probs(tables[n], z[n]) for n in z)
                for layer in range(self.layers):
                    table = (
                        None
                        if layer == top
                        else self._prior_table(net, layer, values, grids[layer])
                    )
                    if table is None:
                        log_w -= len(z[layer]) * self.latent_bits * math.log(2)
                    else:
                        log_w += _log_probs(table, z[layer])
                probs = self._pixels(net, values)
                log_w += np.where(xi[0].numpy() > 0.5, np.log(probs), np.log1p(-probs)).sum()
                out[i] = -log_w / math.log(2)
        return out


class _Float64Networks:
    """The encoder and decoder in float64, one thread, no autograd: identical numbers when
    encoding and decoding."""

    def __init__(self, vae) -> None:
        self.vae = vae

    def __enter__(self) -> _Float64Networks:
        import copy

        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self._grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        self.net = copy.deepcopy(self.vae).double().cpu().eval()
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self._threads)
        torch.set_grad_enabled(self._grad)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.net.encoder(x.double())

    def decode(self, z: Tensor) -> Tensor:
        return self.net.decoder(z.double())


def _log_probs(table: np.ndarray, buckets: np.ndarray) -> float:
    """sum over dimensions of log table[d, buckets[d]] (the rows normalised), natural log;
    every bucket counts at least the coder's smallest probability, 2**-24."""
    table = table / table.sum(-1, keepdims=True)
    picked = table[np.arange(len(buckets)), buckets].clip(min=2.0**-24)
    return float(np.log(picked).sum())
