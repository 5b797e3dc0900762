"""Packaging for gradhpo."""

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"',
                    (HERE / "gradhpo" / "__init__.py").read_text()).group(1)

CORE = ["jax>=0.4.30", "optax>=0.2.3", "chex>=0.1.86", "numpy>=1.24"]
EXTRAS = {
    "examples": ["scikit-learn>=1.3", "matplotlib>=3.7", "tqdm>=4.60",
                 "flax>=0.8", "scipy>=1.10", "equinox>=0.11"],
    "optuna": ["optuna>=3.5", "scipy>=1.10"],
    "test": ["pytest>=7.4", "pytest-cov>=4.1", "flake8>=6.0",
             "hypothesis>=6.80", "scikit-learn>=1.3", "matplotlib>=3.7",
             "tqdm>=4.60", "flax>=0.8", "optuna>=3.5", "scipy>=1.10",
             "equinox>=0.11",
             "sphinx>=7.0", "sphinx_rtd_theme>=2.0",
             "sphinx-mathjax-offline>=0.0.2"],
    "docs": ["sphinx>=7.0", "sphinx_rtd_theme>=2.0",
             "sphinx-mathjax-offline>=0.0.2", "equinox>=0.11"],
}
EXTRAS["dev"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setup(
    name="gradhpo",
    version=VERSION,
    description="Gradient-based hyperparameter optimisation in JAX",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["gradhpo", "gradhpo.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
