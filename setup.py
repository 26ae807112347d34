"""Package list for setuptools (everything else is in pyproject.toml).

``hf_sparse.model_cards`` is the repository's top-level ``model_cards/templates/`` folder, so an
installed wheel renders model cards from the same templates a clone uses.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["hf_sparse", "hf_sparse.*"]), "hf_sparse.model_cards"],
    package_dir={"hf_sparse.model_cards": "model_cards/templates"},
    package_data={"hf_sparse": ["py.typed"], "hf_sparse.model_cards": ["*.md"]},
)
