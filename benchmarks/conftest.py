"""pytest-benchmark set (``python -m pytest benchmarks/ --benchmark-only``): the shape size option.

Never collected by the default test command (its ``testpaths`` is ``tests``); ``tests/`` runs it once
at ``--bench-size tiny`` to check that it is collected and runs.
"""

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-size",
        choices=["cpu", "tiny"],
        default="cpu",
        help="shapes of the micro-benchmarks: cpu (seconds per case on a 2-core CPU) or tiny (plumbing)",
    )


@pytest.fixture(scope="session")
def bench_size(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--bench-size")
