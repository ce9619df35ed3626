"""Runnable experiments of lcpose (``python -m experiments.<name>``) and their configurations."""
