"""Per-sample, counter-based randomness: a sample's draws depend on its id, never its batch.

Every random draw of an attack is a pure function of ``(seed, key, sample id, element)``:
:class:`SampleRandom` hashes these four with SplitMix64 (Steele et al. 2014, the mixing
function of Java's ``SplittableRandom``) in vectorised int64 torch operations, with no
per-sample Python loop and no generator state. So a sample draws the same noise whatever its
position in a batch, the batch size, the number of shards an evaluation is split into or
their order, and an evaluation's per-sample results are bit-identical across all of these.

Keys name the draw: ``rng.fork("restart", r).uniform(("step", k), (c, h, w))``. The
evaluation runner creates one stream per (attack, epsilon) with the data-set indices of
the samples as ids; an attack follows its samples as they leave the working set with
:meth:`SampleRandom.subset`.

Floating point: uniforms, signs and integers are computed exactly (integer arithmetic and
exact scaling). Normal draws go through ``log``/``cos`` in float64 before rounding to the
requested dtype; torch's vectorised and scalar kernels for those may differ in the last
float64 bit, which survives the rounding to float32 with probability about 2**-29 per value.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from functools import lru_cache

import torch

Key = object
"""A draw's name: a string, number or tuple of those (hashed through its ``repr``)."""

_M64 = (1 << 64) - 1


def _signed(v: int) -> int:
    """An unsigned 64-bit constant as the int64 torch stores."""
    v &= _M64
    return v - (1 << 64) if v >= 1 << 63 else v


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_ID_MUL = _signed(0xD1B54A32D192ED03)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """The SplitMix64 finaliser on int64 tensors (wrapping arithmetic, bits as unsigned)."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def key_hash(*parts: Key) -> int:
    """A signed 64-bit hash of a key (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return _signed(int.from_bytes(digest, "little"))


class SampleRandom:
    """Random draws for a batch of samples, each keyed by its sample id.

    ``SampleRandom(seed, ids)`` with ``ids`` a 1-D integer tensor (the samples' indices in
    the data set). Every draw method takes a ``key`` naming the draw and the per-sample
    ``shape``, and returns a tensor of shape ``(len(ids), *shape)``; the same (seed, stream
    key, draw key, id) always gives the same values.
    """

    def __init__(
        self,
        seed: int,
        sample_ids: torch.Tensor | Sequence[int],
        *,
        device: torch.device | str | None = None,
        _stream: int | None = None,
        _streams: tuple[int, ...] | None = None,
        _group: torch.Tensor | None = None,
    ) -> None:
        ids = torch.as_tensor(sample_ids, dtype=torch.int64)
        if ids.ndim != 1:
            raise ValueError(f"sample ids must be a 1-D tensor, got shape {tuple(ids.shape)}")
        self.ids = ids.to(device if device is not None else ids.device)
        self.seed = int(seed)
        self.stream = key_hash("seed", self.seed) if _stream is None else _stream
        # rows drawn from several streams (see :meth:`concat`): row i uses streams[group[i]]
        self.streams: tuple[int, ...] = (self.stream,) if _streams is None else _streams
        self.group = None if _group is None else _group.to(self.ids.device)

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        if self.group is not None:
            return f"SampleRandom(seed={self.seed}, n={len(self)}, streams={len(self.streams)})"
        return f"SampleRandom(seed={self.seed}, n={len(self)}, stream={self.stream:#x})"

    # -- deriving streams ---------------------------------------------------------------
    def _with(
        self, ids: torch.Tensor, streams: tuple[int, ...], group: torch.Tensor | None
    ) -> SampleRandom:
        return SampleRandom(self.seed, ids, _stream=streams[0], _streams=streams, _group=group)

    def fork(self, *key: Key) -> SampleRandom:
        """An independent stream for the same samples, named by ``key``."""
        streams = tuple(key_hash("fork", s, *key) for s in self.streams)
        return self._with(self.ids, streams, self.group)

    def subset(self, idx: torch.Tensor) -> SampleRandom:
        """The same stream for the samples ``idx`` (a mask or indices) of this batch."""
        idx = idx.to(self.device)
        group = None if self.group is None else self.group[idx]
        return self._with(self.ids[idx], self.streams, group)

    def to(self, device: torch.device | str) -> SampleRandom:
        group = None if self.group is None else self.group.to(device)
        return self._with(self.ids.to(device), self.streams, group)

    @staticmethod
    def concat(parts: Sequence[SampleRandom]) -> SampleRandom:
        """The rows of ``parts`` one after the other, each row keeping its own stream.

        Every row draws exactly what it draws in its part (so a batch of rows from several
        streams, e.g. one per target rank of a sweep, reproduces the separate calls).
        """
        if not parts:
            raise ValueError("concat needs at least one SampleRandom")
        streams: list[int] = []
        groups: list[torch.Tensor] = []
        for p in parts:
            if p.seed != parts[0].seed:
                raise ValueError("concat needs parts with the same seed")
            where = []
            for s in p.streams:
                if s not in streams:
                    streams.append(s)
                where.append(streams.index(s))
            table = torch.tensor(where, dtype=torch.int64, device=parts[0].device)
            g = p.group.to(table.device) if p.group is not None else torch.zeros_like(p.ids)
            groups.append(table[g.to(table.device)])
        ids = torch.cat([p.ids.to(parts[0].device) for p in parts])
        group = torch.cat(groups) if len(streams) > 1 else None
        return parts[0]._with(ids, tuple(streams), group)

    def _draw_key(self, key: Key) -> int | torch.Tensor:
        """The draw's key hash: one int, or one per row for a multi-stream batch."""
        if self.group is None:
            return key_hash("draw", self.stream, key)
        ks = [key_hash("draw", s, key) for s in self.streams]
        return torch.tensor(ks, dtype=torch.int64, device=self.device)[self.group]

    # -- draws ----------------------------------------------------------------------------
    def bits(self, key: Key, shape: Sequence[int] = ()) -> torch.Tensor:
        """64 random bits (as int64) per sample and element: shape ``(n, *shape)``."""
        shape = tuple(int(s) for s in shape)
        m = math.prod(shape)
        per_sample = splitmix64(self.ids * _ID_MUL + self._draw_key(key))  # (n,)
        j = torch.arange(1, m + 1, dtype=torch.int64, device=self.device) * _GOLDEN
        z = splitmix64(per_sample[:, None] + j[None, :])
        return z.reshape(len(self), *shape)

    def bits_cat(self, draws: Sequence[tuple[Key, Sequence[int]]]) -> torch.Tensor:
        """The draws ``self.bits(key, shape)`` for every ``(key, shape)`` of ``draws``, each
        flattened to (n, elements) and laid side by side: one (n, total) tensor, bit for bit
        the same values, from two vectorised SplitMix64 calls instead of two per draw (an
        attack step's window position, signs and sign resamples at the cost of one draw)."""
        sizes = tuple(math.prod(int(s) for s in shape) for _, shape in draws)
        hashes = [key_hash("draw", self.stream, key) for key, _ in draws]
        ks = torch.tensor(hashes, dtype=torch.int64, device=self.device)
        per_sample = splitmix64(self.ids[:, None] * _ID_MUL + ks[None, :])  # (n, draws)
        column, offset = _layout(sizes, self.device)
        return splitmix64(per_sample[:, column] + offset[None, :])

    def bits_many(self, draws: Sequence[tuple[Key, Sequence[int]]]) -> list[torch.Tensor]:
        """``[self.bits(key, shape) for key, shape in draws]``, bit for bit (:meth:`bits_cat`)."""
        shapes = [tuple(int(s) for s in shape) for _, shape in draws]
        z = self.bits_cat(draws)
        sizes = [math.prod(s) for s in shapes]
        n = len(self)
        return [part.reshape(n, *s) for part, s in zip(z.split(sizes, dim=1), shapes, strict=True)]

    def uniform(
        self, key: Key, shape: Sequence[int] = (), dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Uniform in [0, 1), exactly representable in ``dtype`` (24 or 53 random bits)."""
        z = self.bits(key, shape)
        if dtype == torch.float64:
            return _shr(z, 11).to(torch.float64) * 2.0**-53
        return (_shr(z, 40).to(torch.float64) * 2.0**-24).to(dtype)

    def normal(
        self, key: Key, shape: Sequence[int] = (), dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Standard normal (Box-Muller in float64, rounded to ``dtype``)."""
        u1 = (_shr(self.bits((key, 1), shape), 11).to(torch.float64) + 1.0) * 2.0**-53
        u2 = _shr(self.bits((key, 2), shape), 11).to(torch.float64) * 2.0**-53
        return ((-2.0 * torch.log(u1)).sqrt() * torch.cos(2.0 * math.pi * u2)).to(dtype)

    def randint(
        self, key: Key, low: int, high: int | torch.Tensor, shape: Sequence[int] = ()
    ) -> torch.Tensor:
        """Integers in ``[low, high)``; ``high`` may be a per-sample tensor of shape (n,)."""
        z = _shr(self.bits(key, shape), 1)
        span = torch.as_tensor(high, dtype=torch.int64, device=self.device) - low
        if span.ndim == 1:
            span = span.view(-1, *([1] * len(tuple(shape))))
        if bool((span <= 0).any()):
            raise ValueError("randint needs high > low")
        return z % span + low

    def sign(
        self, key: Key, shape: Sequence[int] = (), dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """-1 or +1 with probability 1/2 each."""
        return (_shr(self.bits(key, shape), 63).to(dtype)) * 2 - 1


@lru_cache(maxsize=64)
def _layout(sizes: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For draws of ``sizes`` elements laid side by side: each column's draw index and its
    element offset ``j * golden`` (``j`` from 1 within each draw, as in :meth:`bits`)."""
    column = torch.repeat_interleave(
        torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long)
    )
    j = torch.cat([torch.arange(1, m + 1, dtype=torch.int64) for m in sizes])
    return column.to(device), (j * _GOLDEN).to(device)
