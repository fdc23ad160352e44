"""Counting host syncs without a GPU: the ops that, on CUDA tensors, make the host wait for the device.

A GPU step runs ahead of its kernels only while nothing on the host needs a device value. Reading one back
(`.item()`, `int(t)`, `.tolist()`) or running an op whose output size depends on the data (`torch.unique`,
`nonzero`, boolean-mask indexing, `repeat_interleave` without `output_size`, `bincount`) drains the queue: a sync.
On the CPU these are ordinary calls, so `HostSyncs` counts them as they are dispatched, and a test or benchmark can
show a CUDA step would have none without a GPU (`torch.cuda.set_sync_debug_mode("warn")` is the on-device check).

    with HostSyncs() as syncs:
        loss = model(...); loss.backward()
    syncs.total, syncs.counts  # 0, Counter() once the layout comes from the loader
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Always a readback or a data-dependent output size.
_ALWAYS = {aten._local_scalar_dense.default, aten._unique2.default, aten.unique_dim.default,
           aten.unique_consecutive.default, aten.nonzero.default, aten.masked_select.default, aten.bincount.default,
           aten.equal.default, aten.is_nonzero.default}


def _is_sync(func: Any, args: tuple, kwargs: dict) -> bool:
    if func in _ALWAYS:
        return True
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        # A boolean mask index is a nonzero inside the kernel.
        return any(i is not None and i.dtype == torch.bool for i in args[1])
    return False


class _Dispatch(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    # tolist() on a CPU tensor reads memory directly and dispatches nothing; on CUDA it is a device->host copy.
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        if func is torch.Tensor.tolist:
            self.counts["tolist"] += 1
        return func(*args, **(kwargs or {}))


class HostSyncs:
    """Counts, by op name, the host syncs dispatched inside the `with` block (forward and backward)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self._modes = (_Function(self.counts), _Dispatch(self.counts))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> HostSyncs:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
