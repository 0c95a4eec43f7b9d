"""Helpers shared by relayagent tests."""
