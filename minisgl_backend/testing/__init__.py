"""The harness for tests and benchmarks (tritonserver and frontend launchers, clients, /proc probes); the server does not use it."""
