"""Test helpers: throwaway PostgreSQL clusters for tests, the demo and benchmarks."""
