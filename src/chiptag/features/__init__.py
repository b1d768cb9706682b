"""Frozen-backbone features: extraction through the input path, the verified cache, engines, D4 views and TTA."""
