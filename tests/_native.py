"""Fixtures shared by the tests of the native torch node (tests/test_torch_native*.py):
the built extension (skip where it cannot be built) and the route turned off after each
test, so that no test leaves it on for the next. A test module imports both functions (the
fixtures are named ``ext`` and ``route_off_after``)."""

from __future__ import annotations

import pytest

from batchnorm.adapters.torch import native


@pytest.fixture(scope="module", name="ext")
def built_extension():
    try:
        mod = native.build()
    except Exception as exc:  # noqa: BLE001 - no compiler, no headers: nothing to test
        pytest.skip(f"the native node cannot be built here: {exc!s:.200}")
    native.disable()
    return mod


@pytest.fixture(autouse=True, name="route_off_after")
def route_off_after_each_test():
    yield
    native.disable()


MIB = 1 << 20


@pytest.fixture(name="pool")
def pool_of_256_mib(ext):
    """The extension loaded, an empty output pool of 256 MiB; the old limit back after."""
    native.build()
    old = native.set_pool_limit(256 * MIB)
    native.empty_cache()
    yield
    native.set_pool_limit(old)
    native.empty_cache()
