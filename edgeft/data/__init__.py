"""Data shipped with edgeft: the demo dataset and example pipeline files."""
