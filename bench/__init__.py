"""Benchmarks and probes: policy latency, SFT throughput, vision and heading probes; scripts/benchmark.py runs them."""
