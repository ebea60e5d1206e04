"""Evaluation: the feature network, metrics, the report, and the likelihood bound."""
