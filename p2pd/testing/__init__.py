"""Tools for tests, benchmarks, demos and curious users: real daemons (daemons.py), many
DHT nodes in one process (swarm.py), a simulated network in virtual time (fakenet.py),
a lossy UDP proxy (proxy.py) and throwaway hosts in network namespaces (netns.py)."""
