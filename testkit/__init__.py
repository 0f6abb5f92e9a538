"""What the tests and the benchmarks share: real speech and its corpus, conversations of real
people, the local RunPod job server and worker processes, SeaweedFS, tiny random-weight pipelines,
the fixture tasks. Neither tests/ nor bench/ is imported by it."""
