"""Where the samples of a packed row start, and the causal convolution that restarts at each start.

`PackedRow` reads a row's boundaries from the `cu_seq_lens_q` the trainer passes (the whole row's, on
every SP rank), and from `cu_seq_lens_cpu`, the host copy the trainer passes beside it, what must be known
on the host (the reference's loop, fla's chunk tables) without reading the device.
`segment_conv1d` is a depthwise causal convolution whose window never reaches into the previous sample:
each sample is laid out after K-1 zeros and one `conv1d` runs over that layout, so every output is what
the convolution gives on its sample alone (same kernel, same sums), with no loop and no host read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PackedRow:
    """The sample boundaries of one packed row of `length` tokens: `cu` int `[n+1]`, 0 ... length, on the
    device, and `cu_cpu`, the same on the host when the caller has it."""

    cu: torch.Tensor
    length: int
    cu_cpu: torch.Tensor | None = None
    _sample: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_kwargs(cls, kwargs: dict, length: int) -> PackedRow | None:
        cu = kwargs.get("cu_seq_lens_q")
        return None if cu is None else cls(cu, length, kwargs.get("cu_seq_lens_cpu"))

    @property
    def samples(self) -> int:
        return self.cu.numel() - 1  # a shape: no device read

    def sample_index(self) -> torch.Tensor:
        """`[T]` long: the sample each token belongs to (computed on the device)."""
        if self._sample is None:
            tokens = torch.arange(self.length, device=self.cu.device)
            self._sample = torch.searchsorted(self.cu[1:].long(), tokens, right=True)
        return self._sample

    def bounds(self) -> list[int]:
        """The boundaries on the host (a device read when there is no host copy: the reference path only)."""
        b = (self.cu_cpu if self.cu_cpu is not None else self.cu).tolist()
        if b[0] != 0 or b[-1] != self.length or any(n < c for c, n in zip(b[:-1], b[1:])):
            raise ValueError(f"cu_seq_lens {b} must rise from 0 to the packed length {self.length}")
        return b


def segment_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row: PackedRow, activation=None
) -> torch.Tensor:
    """Depthwise causal convolution within each sample: x `[T, C]`, weight `[C, K]` -> `[T, C]`.

    Output t sums weight[:, K-1-j] * x[t-j] over 0 <= j < K for the j that stay in t's sample (the
    window is zero before a sample starts), then `activation`, as HF's `causal_conv1d_fn` on that sample.
    """
    t, c = x.shape
    k = weight.shape[-1]
    x = x.to(weight.dtype)
    if k > 1:
        # Token i goes to slot i + (K-1)*(sample+1): K-1 zero slots before every sample.
        slot = torch.arange(t, device=x.device) + (k - 1) * (row.sample_index() + 1)
        spread = x.new_zeros(t + (k - 1) * row.samples, c).index_copy(0, slot, x)  # [T + (K-1)n, C]
        out = F.conv1d(spread.t()[None], weight[:, None, :], bias, groups=c)[0]  # [C, T + (K-1)(n-1)]
        y = out.t().index_select(0, slot - (k - 1))  # output of slot s sits at s - (K-1)
    else:
        y = x * weight[:, 0] + (bias if bias is not None else 0)
    return activation(y) if activation is not None else y


class NoMasks(dict):
    """The per-layer-type mask mapping HF hybrid models accept in place of `attention_mask`: no mask for any
    layer type. Packed rows are delimited by cu_seq_lens, and building the recurrent layers' 2-D mask from
    an all-ones mask would read `torch.all(mask == 1)` back from the GPU (a host sync) in every forward."""

    def __missing__(self, key: str) -> None:
        return None
