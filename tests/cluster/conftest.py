"""Fixtures for the operator's cluster tests (the shared ones live in tests/conftest.py)."""

from tests.infra.operator_fixtures import (  # noqa: F401
    agent_node,
    kljs,
    operator,
    operator_identity,
    pytest_runtest_makereport,
    start_operator,
)
