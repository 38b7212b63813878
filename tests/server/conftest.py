"""The server tests use the engine tests' fixtures (the built-in model, its reference copy,
adapters of every method, started engines)."""

from tests.engine.conftest import (  # noqa: F401  (fixtures)
    adapters,
    builtin_dir,
    make_engine,
    ref_base,
    ref_tokenizer,
    reference,
)
