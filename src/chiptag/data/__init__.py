"""Data: label tables, images, splits, validation and the synthetic demo generator."""
