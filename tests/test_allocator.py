"""The allocator setting that keeps DP steps off fresh OS pages."""

from __future__ import annotations

import sys

import pytest
import torch

from shared.allocator import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_is_set_once_and_large_tensors_still_work() -> None:
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # cached: set once per process
    big = torch.ones(64, 512, 384)  # 50 MB, above glibc's default mmap threshold
    del big
    assert float(torch.zeros(64, 512, 384).sum()) == 0.0  # reused memory is zeroed as asked
