"""Helpers for the supervision-core tests: child programs and a test harness."""
