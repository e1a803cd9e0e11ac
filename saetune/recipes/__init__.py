"""Shipped YAML recipes."""
