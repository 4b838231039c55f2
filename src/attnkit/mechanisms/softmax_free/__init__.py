"""Softmax alternatives: an elementwise activation of the scores (sigmoid, softplus)."""
