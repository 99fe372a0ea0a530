"""Choosing each device's split point from measured profiles (docs/algorithms.md, "Split-point planning").

Pure maths, no I/O: the cloud feeds it what devices and edges measured (``profile`` messages) and the model's
activation sizes, and gets each device's cut with its predicted time.

The per-mini-batch time of a device at cut ``c`` (blocks ``[0, c)`` on the device, ``[c, n)`` at its edge)::

    T(c) = sum_{l < c} t_dev[l] + 2 (lat + a_c / B) + rho * sum_{l >= c} t_edge[l]      (c < n)
    T(n) = sum_l t_dev[l]                                                               (local training)

``t_dev``, ``t_edge``: forward + backward seconds of each block for one mini-batch, measured on the device and
on the edge; ``a_c``: bytes of one mini-batch's activations at the cut (the gradient coming back is as large);
``B``, ``lat``: the link's bandwidth (bytes/s) and one-way latency, measured on the real connection; ``rho``:
devices sharing the edge, whose blocks the edge runs in turn. A cut is allowed when the device's blocks fit
its memory limit (weights, gradients, optimizer state and the activations stashed for backward, per block).

[choice] Candidate cuts are those whose activation is no larger than that of every shallower cut (and local
training). A cut that sends more than a shallower one while computing more on the device helps only to take
work off a busy edge; leaving such cuts out is what guarantees that a faster link never moves the cut towards
the device (more blocks on it): on the candidates ``a_c`` does not grow with ``c``, so ``T(c2) - T(c1)`` for
``c2 > c1`` can only grow with ``B``. Ties go to the smaller cut. For the models here (VGG-5, the MLP) every
cut is a candidate; the CNN's cut after its first fully connected layer (512 floats, against 256 at the cut
before) is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

TIE = 1e-9  # relative


@dataclass(frozen=True)
class NodeProfile:
    """What a node measured of the model's blocks, for one mini-batch of ``batch_size`` samples."""

    block_s: tuple[float, ...]  # forward + backward seconds per block
    block_bytes: tuple[int, ...] = ()  # training memory per block (weights, gradients, optimizer state, activations)
    batch_size: int = 0

    @property
    def n_blocks(self) -> int:
        return len(self.block_s)


@dataclass(frozen=True)
class Link:
    """A device's link to its edge: bandwidth in bytes per second, one-way latency in seconds."""

    bandwidth: float
    latency_s: float = 0.0


@dataclass(frozen=True)
class CutChoice:
    cut: int
    batch_s: float  # predicted T(cut), seconds per mini-batch
    device_s: float  # the three terms of T
    link_s: float
    edge_s: float
    memory: int  # the device's training memory at this cut, bytes


def candidates(act_bytes: Sequence[float]) -> list[int]:
    """The candidate cuts of a model with ``len(act_bytes) + 1`` blocks: ``act_bytes[c - 1]`` is the size of
    the activations at cut ``c`` (1..n-1). Cuts whose activation is no larger than every shallower cut's, and n."""
    out, smallest = [], float("inf")
    for c, a in enumerate(act_bytes, start=1):
        if a <= smallest:
            out.append(c)
            smallest = a
    return [*out, len(act_bytes) + 1]


def batch_time(cut: int, device: NodeProfile, edge_s: Sequence[float], act_bytes: Sequence[float], link: Link,
               rho: float) -> CutChoice:
    """T(cut) and its terms, summed from scratch (the reference :func:`plan_cut` agrees with)."""
    n = device.n_blocks
    if not 1 <= cut <= n:
        raise ValueError(f"cut {cut} outside 1..{n}")
    dev = float(sum(device.block_s[:cut]))
    memory = int(sum(device.block_bytes[:cut])) if device.block_bytes else 0
    if cut == n:
        return CutChoice(cut, dev, dev, 0.0, 0.0, memory)
    link_s = 2.0 * (link.latency_s + act_bytes[cut - 1] / link.bandwidth)
    edge = rho * float(sum(edge_s[cut:]))
    return CutChoice(cut, dev + link_s + edge, dev, link_s, edge, memory)


def _check(device: NodeProfile, edge_s: Sequence[float], act_bytes: Sequence[float], link: Link, rho: float) -> None:
    n = device.n_blocks
    if n < 1 or len(edge_s) != n or len(act_bytes) != n - 1:
        raise ValueError(f"profiles disagree on the number of blocks: device {n}, edge {len(edge_s)}, "
                         f"activations {len(act_bytes)} (want n - 1)")
    if device.block_bytes and len(device.block_bytes) != n:
        raise ValueError("block_bytes must have one entry per block")
    if not link.bandwidth > 0 or link.latency_s < 0 or rho < 0:
        raise ValueError("bandwidth must be > 0, latency and rho >= 0")


def plan_cut(device: NodeProfile, edge_s: Sequence[float], act_bytes: Sequence[float], link: Link, *,
             rho: float = 1.0, memory_limit: int = 0, allowed: Sequence[int] | None = None) -> CutChoice | None:
    """The candidate cut with the smallest T under the device's memory limit (0: none), in one pass over prefix
    sums; None when no candidate fits. ``allowed`` narrows the candidates (a device class that must train
    locally)."""
    _check(device, edge_s, act_bytes, link, rho)
    n = device.n_blocks
    dev_prefix = [0.0]
    for t in device.block_s:
        dev_prefix.append(dev_prefix[-1] + t)
    edge_suffix = [0.0] * (n + 1)
    for i in range(n - 1, -1, -1):
        edge_suffix[i] = edge_suffix[i + 1] + edge_s[i]
    mem_prefix = [0]
    for b in device.block_bytes or [0] * n:
        mem_prefix.append(mem_prefix[-1] + int(b))
    best: CutChoice | None = None
    for c in candidates(act_bytes):
        if allowed is not None and c not in allowed:
            continue
        if memory_limit and mem_prefix[c] > memory_limit:
            continue
        if c == n:
            choice = CutChoice(c, dev_prefix[c], dev_prefix[c], 0.0, 0.0, mem_prefix[c])
        else:
            link_s = 2.0 * (link.latency_s + act_bytes[c - 1] / link.bandwidth)
            edge = rho * edge_suffix[c]
            choice = CutChoice(c, dev_prefix[c] + link_s + edge, dev_prefix[c], link_s, edge, mem_prefix[c])
        # Ties go to the smaller cut; times within TIE of each other are ties (prefix sums round differently
        # from a sum taken from scratch).
        if best is None or choice.batch_s < best.batch_s - TIE * max(best.batch_s, 1e-3):
            best = choice
    return best
