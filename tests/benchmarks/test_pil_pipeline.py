"""The benchmark's reference-style PIL pipeline yields batches of every view."""

from __future__ import annotations

import torch

from benchmarks.pil_pipeline import PILReferencePipeline
from cdc_serve_training.data import ImageData


def test_pil_reference_pipeline() -> None:
    x = torch.randint(0, 256, (8, 3, 32, 32), generator=torch.Generator().manual_seed(0)).to(
        torch.uint8
    )
    data = ImageData(x, torch.zeros(8, dtype=torch.long), 1, "t", (0.5,) * 3, (0.25,) * 3)
    batch, index = next(iter(PILReferencePipeline(data, ("weak", "strong", "moco")).loader(4, 0)))
    assert len(batch) == 3 and all(v.shape == (4, 3, 32, 32) for v in batch)
    assert index.shape == (4,)
