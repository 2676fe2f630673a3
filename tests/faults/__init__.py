"""Fault tests: real processes (Redis, brokers) killed with real signals, bounded in time."""
