"""Training utilities of the MoL recipe: per-modality optimizer groups and losses."""
