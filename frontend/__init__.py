"""BuildKit gateway frontend (`# syntax=REGISTRY/lazybuild`): Dockerfile -> LLB. See ARCHITECTURE.md."""
