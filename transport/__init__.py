"""Flower's processes and command line, and the process plumbing both the hospital and the coordinator use
(neither imports the other: both import this)."""
