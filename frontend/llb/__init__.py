"""LLB: our .proto subset (compiled at build time), the op graph builder and its digests."""
