"""Benchmarks: each module has ``main(argv) -> int`` and writes JSON + markdown figures."""
