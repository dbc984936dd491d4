"""Sweep drivers and result collectors (Setup-II; Setup-I follows the same pattern)."""
