"""Forward passes without transformers' host sync on position ids.

Models that build their own position ids (GPT-NeoX, GPT-2, Llama and most others:
``position_ids = arange(length)[None]``) hand them to transformers' ``create_causal_mask``, which
asks ``find_packed_sequence_indices`` whether the batch packs several sequences per row. That
check reads a device tensor on the host (``(mask[:, -1] == 0).all()``): one device-to-host sync
per forward pass, so the host cannot queue the next batch before the GPU has finished this one
(on an H100 with the 1.4B benchmark model this cost little: the host is the slower side anyway).

Under CUDA graph capture the check cannot read the device, so it returns its mask instead, and
the attention then runs with an explicit mask: another kernel, other last bits than eagerly.
That is what made captured graphs inexact.

For a single row of positions built by the model, the answer is known without looking: ``arange``
is consecutive, so there is no packing and the check returns ``None``. Inside
:func:`consecutive_positions` the check gives that answer for such rows without the sync (and
without the capture-time mask), so every forward pass runs exactly the kernels it runs eagerly,
with the causal mask left to SDPA's ``is_causal``. Any other position ids (several rows, or ids a
caller passed) still go through the original check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

try:  # transformers >= 4.53; older versions have no such check (and no sync to avoid)
    from transformers import masking_utils
except ImportError:  # pragma: no cover - depends on the installed transformers
    masking_utils = None

_CHECK = "find_packed_sequence_indices"


def _broadcast_row(position_ids: torch.Tensor) -> bool:
    """One row of positions, possibly expanded over the batch (stride 0): the model's own."""
    return position_ids.dim() == 2 and (position_ids.shape[0] == 1 or position_ids.stride(0) == 0)


@contextlib.contextmanager
def consecutive_positions() -> Iterator[None]:
    """Within this block, a model's own ``arange`` position ids are known to be unpacked.

    Use it only around forward calls that pass neither ``position_ids`` nor ``attention_mask``
    (the model then builds ``arange`` positions itself), as causal scoring does.
    """
    original = getattr(masking_utils, _CHECK, None)
    if original is None:
        yield
        return

    def known_unpacked(position_ids: torch.Tensor) -> torch.Tensor | None:
        if _broadcast_row(position_ids):
            return None
        return original(position_ids)

    setattr(masking_utils, _CHECK, known_unpacked)
    try:
        yield
    finally:
        setattr(masking_utils, _CHECK, original)
