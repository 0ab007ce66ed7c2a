"""Evaluation tasks built offline from packaged data."""
