"""Versioned data: Delta tables, built-in examples, validation."""
