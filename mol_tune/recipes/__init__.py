"""Recipes run with `tune run mol_tune/recipes/<name> --config <yaml>`."""
