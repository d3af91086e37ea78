"""The vocabulary node engines implement: hardware, workload, operation, engine base types."""
