"""Offline benchmarks: throughput and latency, each with a Hugging Face transformers peer in the same run."""
