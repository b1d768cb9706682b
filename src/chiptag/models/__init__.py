"""Backbone registry and classification heads."""
