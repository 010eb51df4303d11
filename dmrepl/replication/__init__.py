"""Replication: the cycle as a pure plan and a driver, its status, and the run loop."""
