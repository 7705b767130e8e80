"""Analyses of trained models (which vision layer an adaptive model picks, ...)."""
