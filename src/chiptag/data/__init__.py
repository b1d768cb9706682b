"""Data: label tables, the one image input path, splits, validation and the synthetic demo generator."""
