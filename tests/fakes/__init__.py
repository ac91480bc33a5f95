"""In-repo fakes (real servers, not mocks) shared by tests and benchmarks."""
