"""The memory floor of a decode step: bytes over the machine's measured read bandwidth."""

from __future__ import annotations

import pytest
import torch

from fxfuse.codegen.roofline import Floor, read_bandwidth


def test_the_floor_is_bytes_over_the_measured_bandwidth():
    bandwidth = read_bandwidth()
    assert 1e9 < bandwidth < 1e12 and read_bandwidth() == bandwidth  # measured once per thread count
    floor = Floor(seconds=0.030, bytes_read=600_000_000, bandwidth=30e9, threads=torch.get_num_threads())
    assert floor.floor_seconds == pytest.approx(0.020) and floor.ratio == pytest.approx(1.5)
    assert "30.00 ms reading 572 MiB" in str(floor) and "a floor of 20.00 ms: 1.50x the floor" in str(floor)
