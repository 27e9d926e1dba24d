"""Lossless compression of binarised images with a trained VAE: bits-back coding with ANS.

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

FORMAT_VERSION = 2
MAGIC = b"PYROVAE-BB"
# magic, format version, weights hash, image count, height, width, latent bits, payload
# words, then a CRC-32 of all of that and the payload; all little-endian.  Version 1 (one
# particle) is still written for K = 1, so that its files are those of earlier releases;
# version 2 adds the particle count K after the latent bits.
_HEADER = struct.Struct("<10sH32sIHHBI")
_HEADER_V2 = struct.Struct("<10sH32sIHHBHI")
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
    image_shape: tuple[int, int]
    latent_bits: int
    weights: bytes
    particles: int = 1

    @property
    def num_bits(self) -> int:
        """The message's length in bits (the payload, without the header)."""
        return 32 * len(self.words)

    def to_bytes(self) -> bytes:
        """The file's bytes: header (format version, weights hash, image count and shape,
        latent bits, particles), message, CRC."""
        if self.particles == 1:  # the one-particle format of earlier releases
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
                FORMAT_VERSION,
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
        if version == 1:
            header = _HEADER
            magic, version, weights, count, h, w, bits, n_words = header.unpack_from(data)
            particles = 1
        elif version == FORMAT_VERSION and len(data) >= _HEADER_V2.size + _CRC.size:
            header = _HEADER_V2
            magic, version, weights, count, h, w, bits, particles, n_words = header.unpack_from(
                data
            )
        else:
            raise CompressionError(f"format version {version} is not one of the supported 1, 2")
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
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
        return cls(words, count, (h, w), bits, weights, particles)


class BitsBackCoder:
    """Bits-back coding of binary images with a VAE (Bernoulli likelihood, standard normal
    prior, diagonal Gaussian guide: the project's ``VAE``).  ``encode`` and ``decode`` are
    exact inverses; ``information`` gives the code length each image should cost."""

    def __init__(self, vae, latent_bits: int = 10, particles: int = 1) -> None:
        if getattr(vae, "likelihood_name", None) != "bernoulli":
            raise ValueError("bits-back coding here needs a VAE with a Bernoulli likelihood")
        if getattr(vae, "flow", None) or getattr(vae, "covariance", "diagonal") != "diagonal":
            # the coder draws each latent dimension from its own factor of q(z|x)
            raise ValueError("bits-back coding here needs the diagonal Gaussian guide")
        if len(getattr(vae, "latent_sites", ("z",))) != 1:
            raise ValueError(
                "bits-back coding here takes a one-layer VAE; a hierarchical model's layers "
                "are not chained by the coder"
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

    # -- the three models, in float64 on one thread ---------------------------------------

    def _posterior_tables(self, nets, x: Tensor) -> np.ndarray:
        """q(bucket | x): (N, z_dim, buckets) probabilities."""
        loc, scale = nets.encode(x)
        cdf = torch.special.ndtr((self.edges - loc[..., None]) / scale[..., None])
        return (cdf[..., 1:] - cdf[..., :-1]).clamp_min(0).numpy()

    def _pixel_probs(self, nets, buckets: np.ndarray) -> np.ndarray:
        """p(x_d = 1 | z = bucket medians): (N, pixels)."""
        z = self.centres[torch.as_tensor(buckets, dtype=torch.long)]
        return torch.sigmoid(nets.decode(z)).numpy()

    # -- coding ---------------------------------------------------------------------------

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
        probs = self._pixel_probs(nets, z)
        log_px = np.where(x > 0.5, np.log(probs), np.log1p(-probs)).sum(-1)
        normalised = table / table.sum(-1, keepdims=True)
        # the coder gives every bucket at least its smallest probability, 2**-24
        q = normalised[np.arange(z.shape[1]), z].clip(min=2.0**-24)
        return log_px - z.shape[1] * self.latent_bits * math.log(2) - np.log(q).sum(-1)

    @staticmethod
    def _index_probs(log_w: np.ndarray) -> np.ndarray:
        """The normalised importance weights w~ (K,) from log weights, float64."""
        w = np.exp(log_w - log_w.max())
        return w / w.sum()

    def encode(self, images: Tensor, trace: list | None = None) -> CompressedImages:
        """Compress binary images (N, H*W) into one message.  With a list as ``trace``,
        appends (message length in bits, buckets of z) after each image (with K > 1 the
        buckets of all K particles, (K, z_dim), and the chosen index)."""
        x = _check_binary(images, self.vae.x_dim)
        if self.particles > 1:
            return self._encode_particles(x, trace)
        categorical, bernoulli, uniform = self._models()
        coder = self._stream.stack.AnsCoder()
        with _Float64Networks(self.vae) as nets:
            for start in range(0, x.shape[0], _CHUNK):
                tables = self._posterior_tables(nets, x[start : start + _CHUNK])
                for i in range(start, min(start + _CHUNK, x.shape[0])):
                    if i == 0:  # clean start: nothing to take bits from yet
                        z = self._first_buckets(tables[0])
                    else:
                        z = coder.decode(categorical, tables[i - start])
                    probs = self._pixel_probs(nets, z[None])[0]
                    coder.encode_reverse(x[i].numpy().astype(np.int32), bernoulli, probs)
                    coder.encode_reverse(z, uniform)
                    if trace is not None:
                        trace.append((coder.num_valid_bits(), z))
        return self._message(coder, x.shape[0])

    def _message(self, coder, count: int) -> CompressedImages:
        return CompressedImages(
            coder.get_compressed().astype(np.uint32),
            count,
            tuple(self.vae.image_shape),
            self.latent_bits,
            self.weights,
            self.particles,
        )

    def _encode_particles(self, x: Tensor, trace: list | None) -> CompressedImages:
        """BB-IS (see the module docstring) for K = ``self.particles`` > 1."""
        k = self.particles
        categorical, bernoulli, uniform = self._models()
        index_uniform = self._stream.model.Uniform(k)
        coder = self._stream.stack.AnsCoder()
        with _Float64Networks(self.vae) as nets:
            for start in range(0, x.shape[0], _CHUNK):
                tables = self._posterior_tables(nets, x[start : start + _CHUNK])
                for i in range(start, min(start + _CHUNK, x.shape[0])):
                    table = tables[i - start]
                    repeated = np.repeat(table[None], k, axis=0).reshape(-1, self.buckets)
                    if i == 0:  # clean start: nothing to take bits from yet
                        z = np.repeat(self._first_buckets(table)[None], k, axis=0)
                        j = 0
                    else:
                        z = coder.decode(categorical, repeated).reshape(k, -1)
                        probs_j = self._index_probs(self._log_weights(nets, x[i].numpy(), z, table))
                        j = int(coder.decode(categorical, probs_j[None])[0])
                    others = np.delete(np.arange(k), j)
                    coder.encode_reverse(
                        z[others].reshape(-1), categorical, repeated[: (k - 1) * z.shape[1]]
                    )
                    probs = self._pixel_probs(nets, z[j][None])[0]
                    coder.encode_reverse(x[i].numpy().astype(np.int32), bernoulli, probs)
                    coder.encode_reverse(z[j], uniform)
                    coder.encode_reverse(np.array([j], dtype=np.int32), index_uniform)
                    if trace is not None:
                        trace.append((coder.num_valid_bits(), z, j))
        return self._message(coder, x.shape[0])

    def _decode_particles(self, message: CompressedImages) -> Tensor:
        k = self.particles
        categorical, bernoulli, uniform = self._models()
        index_uniform = self._stream.model.Uniform(k)
        coder = self._stream.stack.AnsCoder(message.words.copy())
        out = np.empty((message.count, self.vae.x_dim), dtype=np.float32)
        with _Float64Networks(self.vae) as nets:
            for i in reversed(range(message.count)):
                j = int(coder.decode(index_uniform, 1)[0])
                z_j = coder.decode(uniform, self.vae.z_dim)
                probs = self._pixel_probs(nets, z_j[None])[0]
                x = coder.decode(bernoulli, probs)
                out[i] = x
                table = self._posterior_tables(nets, torch.as_tensor(x[None], dtype=torch.float64))[
                    0
                ]
                repeated = np.repeat(table[None], k, axis=0).reshape(-1, self.buckets)
                others = coder.decode(categorical, repeated[: (k - 1) * len(z_j)])
                z = np.insert(others.reshape(k - 1, -1), j, z_j, axis=0)
                if i > 0:  # the bits back: the index, then the K latents
                    probs_j = self._index_probs(self._log_weights(nets, x, z, table))
                    coder.encode_reverse(np.array([j], dtype=np.int32), categorical, probs_j[None])
                    coder.encode_reverse(z.reshape(-1), categorical, repeated)
                elif j != 0 or not (z == self._first_buckets(table)[None]).all():
                    raise CompressionError("the first image does not decode consistently")
        if not coder.is_empty():
            raise CompressionError("the message does not decode to the images it claims to hold")
        return torch.from_numpy(out)

    def decode(self, message: CompressedImages) -> Tensor:
        """The images of ``message``, (N, H*W) float32 in {0, 1}; raises
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
        if self.particles > 1:
            try:
                return self._decode_particles(message)
            except (ValueError, IndexError) as e:  # a corrupt message can fail inside the coder
                raise CompressionError(f"the message does not decode: {e}") from None
        categorical, bernoulli, uniform = self._models()
        coder = self._stream.stack.AnsCoder(message.words.copy())
        out = np.empty((message.count, self.vae.x_dim), dtype=np.float32)
        with _Float64Networks(self.vae) as nets:
            for i in reversed(range(message.count)):
                z = coder.decode(uniform, self.vae.z_dim)
                probs = self._pixel_probs(nets, z[None])[0]
                x = coder.decode(bernoulli, probs)
                out[i] = x
                x64 = torch.as_tensor(x[None], dtype=torch.float64)
                table = self._posterior_tables(nets, x64)[0]
                if i > 0:
                    coder.encode_reverse(z, categorical, table)  # the bits back
                elif not np.array_equal(z, self._first_buckets(table)):
                    raise CompressionError("the first image does not decode consistently")
        if not coder.is_empty():
            raise CompressionError("the message does not decode to the images it claims to hold")
        return torch.from_numpy(out)

    def information(
        self, images: Tensor, buckets: np.ndarray | None = None, seed: int = 0
    ) -> np.ndarray:
        """The code length each image should cost, in bits: ``-log2 p(x|ẑ) - log2 P(ẑ) +
        log2 Q(ẑ|x)`` for the latent buckets ẑ (N, z_dim) with one particle, and
        ``-log2 (mean_k w_k)`` for K particles (N, K, z_dim), the importance-weighted
        estimate's; by default ẑ is drawn from ``Q(·|x)``.  Its mean over draws is the
        discretised model's -ELBO (K = 1) or -log p̂_K(x) (K > 1), in bits."""
        x = _check_binary(images, self.vae.x_dim)
        k = self.particles
        out = np.empty(x.shape[0])
        gen = np.random.default_rng(seed)
        with _Float64Networks(self.vae) as nets:
            for start in range(0, x.shape[0], _CHUNK):
                xs = x[start : start + _CHUNK]
                tables = self._posterior_tables(nets, xs)
                tables = tables / tables.sum(-1, keepdims=True)
                for n in range(len(xs)):
                    if buckets is None:
                        u = gen.random((k, tables.shape[1], 1))
                        z = (tables[n].cumsum(-1) < u).sum(-1).clip(max=self.buckets - 1)
                    else:
                        z = np.asarray(buckets[start + n]).reshape(k, -1)
                    log_w = self._log_weights(nets, xs[n].numpy(), z, tables[n])
                    top = log_w.max()
                    log_mean = top + math.log(np.exp(log_w - top).mean())
                    out[start + n] = -log_mean / math.log(2)
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


def _check_binary(images: Tensor, x_dim: int) -> Tensor:
    x = torch.as_tensor(images)
    x = x.reshape(len(x), x[0].numel() if len(x) else x_dim).double().cpu()
    if x.shape[1] != x_dim:
        raise ValueError(f"images have {x.shape[1]} pixels, the model {x_dim}")
    if not ((x == 0) | (x == 1)).all():
        raise ValueError("bits-back coding here is for binary images (0/1 values)")
    return x
