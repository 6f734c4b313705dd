"""Measure the peak tensor memory of a piece of code: on CPU by tracking storages, on CUDA from
the caching allocator's statistics.

    peak = measure_peak(lambda: model(ids).sum().backward(), track=list(model.parameters()))

On CPU there is no allocator statistic to read, so `MemoryTracker` (a `TorchDispatchMode`)
watches every op: each output whose untyped storage it has not seen (keyed by the storage's
`data_ptr`) adds `nbytes` to the live total, and `weakref.finalize` on that storage subtracts it
when the storage is freed. Outputs that share a storage with an input (views, in-place ops,
`.float()` of a float tensor) allocate nothing and add nothing.
Tensors that exist before the measured code (parameters, inputs) are counted through `track` or
a plain `baseline` byte count. The CPU autograd engine runs backward on the calling thread, so
the mode sees backward's ops too.

Custom ops (`ringattn::ring_fwd`, `ringattn::flash_fwd`, ...) reach a dispatch mode as one op
whose Python implementation would run with the mode switched off; the tracker re-enters itself
and redispatches them to their CPU kernel, so the ring's buffers and the attention tiles inside
them are counted. What it cannot see: memory held by non-tensor code (gloo's internal buffers,
the allocator's caches) and temporaries inside a single aten kernel (e.g. a copy that `matmul`
makes before calling BLAS).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def _storage_key(t: object) -> int | None:
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
        return None
    return t.untyped_storage().data_ptr()


class MemoryTracker(TorchDispatchMode):
    """Live and peak bytes of CPU tensor storages created while the mode is active.

    Args:
        baseline: bytes already in use that the tracker should count as live from the start
            (and never free), e.g. an estimate of state it cannot `track`.

    Attributes:
        live: bytes of the storages alive now (tracked ones and those created under the mode,
            plus `baseline`).
        peak: the largest `live` seen since construction or the last `reset_peak`.
    """

    def __init__(self, *, baseline: int = 0) -> None:
        super().__init__()
        self.live = baseline
        self.peak = baseline
        self._bytes: dict[int, int] = {}  # storage data_ptr -> nbytes, for live storages

    def track(self, *tensors: torch.Tensor) -> None:
        """Count existing tensors (parameters, inputs) until their storages are freed.

        A storage shared by several tensors (tied weights, views) counts once.
        """
        for t in tensors:
            self._add(t)

    def reset_peak(self) -> None:
        """Start a new peak from the current live total."""
        self.peak = self.live

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key == 0 or nbytes == 0:
            return
        known = self._bytes.get(key)
        if known is None:
            weakref.finalize(storage, self._free, key)
        self._bytes[key] = nbytes
        self.live += nbytes - (known or 0)  # a known storage counts only a change in size
        self.peak = max(self.peak, self.live)

    def _free(self, key: int) -> None:
        self.live -= self._bytes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat_inputs = tree_flatten((args, kwargs))[0]
        on_cpu = all(t.device.type == "cpu" for t in flat_inputs if isinstance(t, torch.Tensor))
        if func.namespace in ("aten", "prim", "prims") or not on_cpu:
            out = func(*args, **kwargs)
        else:  # a custom op: run its CPU kernel with this mode watching the ops inside
            with self:
                out = func.redispatch(_CPU_KEYS, *args, **kwargs)
        inputs = {_storage_key(t) for t in flat_inputs}
        for t in tree_flatten(out)[0]:
            key = _storage_key(t)
            if key is not None and key not in inputs:  # views, in-place, no-op casts: nothing new
                self._add(t)
        return out


def measure_peak(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    track: Iterable[torch.Tensor] = (),
    baseline: int = 0,
) -> int:
    """Peak bytes of tensor memory while `fn()` runs.

    Args:
        fn: the code to measure (e.g. a forward and backward), called once.
        device: "cpu" (a `MemoryTracker`) or a CUDA device (the caching allocator's
            `max_memory_allocated`, which already includes every tensor on the device).
        track: CPU only: tensors that exist before `fn` runs and count while alive.
        baseline: CPU only: further bytes counted as live throughout.

    Returns:
        The peak in bytes: on CPU, tracked tensors + baseline + everything `fn` allocated and
        still held at the worst moment; on CUDA, the allocator's peak of allocated bytes.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    if device.type != "cpu":
        raise ValueError(f"measure_peak supports cpu and cuda devices, got {device}")
    tracker = MemoryTracker(baseline=baseline)
    tracker.track(*track)
    with tracker:
        fn()
    return tracker.peak
