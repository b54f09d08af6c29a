"""The cluster tier: jobs on a test cluster of real hosts (tests/cluster.py; marked cluster and slow)."""
