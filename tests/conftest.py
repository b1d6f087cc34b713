"""Test-suite policy for tests that need a kTLS kernel.

Tests marked ``kernel`` need kernel TLS. On a machine without it (our hosts: no ``CONFIG_TLS``) they are
reported as skipped with the reason "needs a kTLS kernel" — never silently — and run for real inside the
kernel matrix (``scripts/kernel_matrix.py``), whose guests set ``KTLS_GUEST``. Inside a guest a kernel
without kTLS is a failure of the bench, not a skip.
"""

from __future__ import annotations

import faulthandler
import os
import socket
from collections.abc import Iterator

import pytest

from certs import CertFiles, make_cert
from ktls.kernel import KernelSupport, probe

IN_GUEST = bool(os.environ.get("KTLS_GUEST"))
NEEDS_KERNEL = "needs a kTLS kernel (runs in the kernel matrix: scripts/kernel_matrix.py)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kernel_items = [item for item in items if item.get_closest_marker("kernel")]
    if not kernel_items or IN_GUEST or probe().available:
        return
    for item in kernel_items:
        item.add_marker(pytest.mark.skip(reason=NEEDS_KERNEL))


#: Seconds past pytest-timeout's limit after which a test still running ends the whole process.
HARD_BOUND_MARGIN = 60.0


@pytest.fixture(autouse=True)
def _hard_bound(request: pytest.FixtureRequest) -> Iterator[None]:
    """A second bound under pytest-timeout's: its ``SIGALRM`` raises wherever the main thread is, and when that
    is an asyncio callback the loop logs the exception and runs on (a 5.10 guest once waited 14 minutes so).
    ``HARD_BOUND_MARGIN`` seconds later faulthandler prints every thread's stack and ends the process."""
    marker = request.node.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else float(request.config.getini("timeout") or 0)
    if limit <= 0:
        yield
        return
    faulthandler.dump_traceback_later(limit + HARD_BOUND_MARGIN, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="session")
def support() -> KernelSupport:
    """The kernel's kTLS capabilities; in a guest, fails loudly when kTLS is missing."""
    result = probe()
    if not result.available:
        pytest.fail(f"kTLS unavailable inside the kernel guest: {result.ulp_error}")
    return result


@pytest.fixture(scope="session")
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server


@pytest.fixture
def tcp_pair(listener: socket.socket) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback TCP pair (client, server) with timeouts, so no test can hang."""
    client = socket.create_connection(listener.getsockname(), timeout=20)
    server, _ = listener.accept()
    server.settimeout(20)
    with client, server:
        yield client, server


@pytest.fixture(scope="session")
def rsa_cert(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return make_cert(tmp_path_factory.mktemp("certs"), "rsa", "rsa")


@pytest.fixture(scope="session")
def ecdsa_cert(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return make_cert(tmp_path_factory.mktemp("certs"), "ecdsa", "ecdsa")
