"""Hydra configs for r1core, shipped inside the package as r1core.conf."""
