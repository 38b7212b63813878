"""The deploy tests use the engine tests' built-in model fixture."""

from tests.engine.conftest import builtin_dir  # noqa: F401  (fixture)
