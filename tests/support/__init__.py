"""Helpers shared by the test suites (`from tests.support.serving import live_server`); never imported by the
project's packages or benchmarks."""
