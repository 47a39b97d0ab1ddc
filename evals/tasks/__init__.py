"""lm-eval task templates (``humpback_*.yaml``) and the loaders and hooks they name."""
