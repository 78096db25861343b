"""Integer helpers for launch shapes. triton.cdiv / triton.next_power_of_2 are constexpr functions that cost ~6 us
per host call (more than some kernels run); launchers call these plain versions instead."""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints a >= 0, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0, as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
