"""Shared code of the MLflow stack: users store, access rules, gate, stackctl."""
