"""Evaluation statistics: bootstrap confidence intervals of slide-level metrics and paired AUC tests."""
