"""Lab guests for the tests: pytest fixtures that boot a real QEMU guest and stop it afterwards.

Use in a test module::

    from support.lab import lab_guest, LAB_MATRIX  # noqa: F401

    def test_something(lab_guest):                 # 6.1, 1 vCPU, module scope
        status, output = lab_guest.run("/workload once")

    @pytest.mark.parametrize("lab_guest", LAB_MATRIX, indirect=True)
    def test_everywhere(lab_guest): ...            # every kernel, 1 and 2 vCPUs

    @pytest.mark.parametrize("lab_guest", [lab_config("6.12", vcpus=2, workload="steady")],
                             indirect=True)
    def test_steady(lab_guest): ...

The parameter of ``lab_guest`` is a dict of ``guestlab.Guest`` keyword arguments
(``lab_config`` builds one with a readable test id). Guests are shared by every test of a module
that uses the same parameter; a test needing its own guest (e.g. with the KVMI plugin loaded)
uses ``lab_guest_factory`` or ``boot_lab_guest(...)``. Boot failures fail the test with the
serial log tail; they are never skipped. The serial and QEMU logs of every guest are kept in
pytest's tmp directory for post-mortems.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pytest

from guestlab import Guest

DEFAULT_CONFIG: dict[str, Any] = {"kernel": "6.1", "vcpus": 1}


def lab_config(kernel: str = "6.1", vcpus: int = 1, **options: Any):
    """A ``lab_guest`` parameter: Guest keyword arguments with an id like ``6.12-2vcpu``."""
    ident = f"{kernel}-{vcpus}vcpu" + "".join(f"-{k}={v}" for k, v in sorted(options.items()))
    return pytest.param({"kernel": kernel, "vcpus": vcpus, **options}, id=ident)


LAB_KERNELS = ("6.1", "6.12")
LAB_MATRIX = [lab_config(kernel, vcpus) for kernel in LAB_KERNELS for vcpus in (1, 2)]


@contextlib.contextmanager
def boot_lab_guest(log_dir=None, **options: Any) -> Iterator[Guest]:
    """Boot a guest (Guest keyword arguments), yield it ready, always stop it."""
    with Guest(log_dir=log_dir, **options) as guest:
        yield guest


@pytest.fixture(scope="module")
def lab_guest(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    """A ready lab guest shared by the module (parametrize indirectly with lab_config)."""
    options = dict(getattr(request, "param", None) or DEFAULT_CONFIG)
    with boot_lab_guest(tmp_path_factory.mktemp("lab-logs"), **options) as guest:
        yield guest


@pytest.fixture
def lab_guest_factory(tmp_path_factory: pytest.TempPathFactory):
    """Call with Guest keyword arguments to boot guests of the test's own; all are stopped at
    the end of the test."""
    stack = contextlib.ExitStack()
    log_dir = tmp_path_factory.mktemp("lab-logs")

    def boot(**options: Any) -> Guest:
        return stack.enter_context(boot_lab_guest(log_dir, **options))

    with stack:
        yield boot
