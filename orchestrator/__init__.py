"""Distributed, stateful parts of structure-sweep."""
