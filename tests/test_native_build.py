"""The native CPU kernels build wherever the machine allows them: a compile error must fail here, not turn every
test in test_cpu_native.py into a skip (that module skips when the library is missing) and the server quietly onto
the slower fallback."""

import pytest

from tokenworks.model import cpu_native

# The reasons ``cpu_native.library()`` gives for a machine that cannot have the kernels, or a user who said no.
NOT_THIS_MACHINE = ("written for x86-64", "lacks AVX2", "no C compiler", "TOKENWORKS_NATIVE_KERNELS=0")


def test_the_native_kernels_build_where_the_cpu_and_a_compiler_allow():
    lib, reason = cpu_native.library(), cpu_native.unavailable_reason()
    if lib is None and any(r in reason for r in NOT_THIS_MACHINE):
        pytest.skip(reason)
    assert lib is not None, reason
    assert lib.tw_step and lib.tw_q4_matmul and lib.tw_q8_matmul  # the entry points the Python side declares
