"""End-to-end load runner: ``python -m bench.load`` (see bench/README.md)."""
