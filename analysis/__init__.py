"""Reads runs back from MLflow and turns them into tables, plots and reports."""
