"""Prefect flows: they orchestrate stages, and never load model weights themselves."""
