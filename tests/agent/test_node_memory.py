"""Judging a pin on the kernel's view of the node's memory (pure), and reading that view."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoscaler.agent.errors import AgentError
from autoscaler.agent.node_memory import NodeMemory, parse_meminfo, pin_refusal, read_node_memory

GiB = 1 << 30

MEMINFO = """MemTotal:       131072000 kB
MemFree:         1000000 kB
MemAvailable:   52428800 kB
Buffers:           1000 kB
Mlocked:        8388608 kB
HugePages_Total:       0
"""


def test_meminfo_fields_are_read_in_bytes():
    assert parse_meminfo(MEMINFO) == NodeMemory(131072000 * 1024, 52428800 * 1024, 8 * GiB)


def test_meminfo_without_a_needed_field_names_it_and_the_file():
    with pytest.raises(AgentError, match=r"/x/meminfo has no Mlocked"):
        parse_meminfo("MemTotal: 1 kB\nMemAvailable: 1 kB\n", "/x/meminfo")


def test_an_unreadable_meminfo_is_a_clear_error(tmp_path: Path):
    with pytest.raises(AgentError, match=r"cannot read .*nothing-here"):
        read_node_memory(tmp_path / "nothing-here")


def test_this_machines_meminfo_reads():
    memory = read_node_memory()
    assert 0 < memory.available_bytes <= memory.total_bytes and memory.mlocked_bytes >= 0


def test_a_pin_is_refused_only_when_it_would_leave_less_than_the_reserve():
    node = NodeMemory(total_bytes=100 * GiB, available_bytes=40 * GiB, mlocked_bytes=30 * GiB)
    assert pin_refusal(node, 30 * GiB) is None  # leaves 10 GiB = the 10% reserve
    why = pin_refusal(node, 31 * GiB)
    assert why is not None and "40.0 GiB available" in why and "30.0 GiB mlock'ed" in why
    assert "leave 9.0 GiB" in why and "reserve of 10.0 GiB (10% of 100.0 GiB)" in why
    assert pin_refusal(node, 35 * GiB, reserve_fraction=0.0) is None
    assert pin_refusal(node, 0) is None  # nothing new to lock (a file already pinned)
    short = NodeMemory(100 * GiB, 5 * GiB, 0)
    assert "leave 0.0 GiB" in (pin_refusal(short, 20 * GiB) or "")


def test_the_agents_own_pins_are_taken_out_of_what_the_kernel_calls_available():
    """File pages pinned by cuMemHostRegister stay on the page cache's lists, so MemAvailable
    still counts the weights the agent pinned earlier: they are subtracted here."""
    node = NodeMemory(total_bytes=100 * GiB, available_bytes=40 * GiB, mlocked_bytes=0)
    assert pin_refusal(node, 20 * GiB) is None
    why = pin_refusal(node, 20 * GiB, own_pinned_bytes=16 * GiB)
    assert why is not None and "24.0 GiB available" in why and "less 16.0 GiB" in why
