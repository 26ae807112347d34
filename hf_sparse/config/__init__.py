"""Configuration: the recipe schema and its YAML loader (positions, ``--set``), below every other layer."""
