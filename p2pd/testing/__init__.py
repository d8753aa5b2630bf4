"""Tools for tests, benchmarks, demos and curious users: real daemons and real sockets."""
