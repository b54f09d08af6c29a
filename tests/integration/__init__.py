"""Integration tests: real launchers, several processes, injected faults (marked slow)."""
