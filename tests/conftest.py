"""Shared fixtures: float64 for gradient checks, PRNG keys."""

import jax
import pytest


@pytest.fixture
def x64():
    """Enables float64 for the duration of one test."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)
