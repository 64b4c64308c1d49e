"""Stages: the interface every stage implements (base.py), the registry that finds them by name
(registry.py), and the stages themselves with their model code beside them."""
