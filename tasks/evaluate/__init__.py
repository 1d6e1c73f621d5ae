"""Evaluate stage: labelled sets drawn from the images table, retrieval metrics, answer checks."""
