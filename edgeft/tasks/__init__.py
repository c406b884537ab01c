"""Embedded sample tasks for the demo and the tests."""
