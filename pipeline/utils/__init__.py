"""Layer 0, below everything: atomic file writes and device helpers. Imports nothing from the project."""
