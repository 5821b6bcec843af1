"""Forwarding calls to upstream model servers: selection, headers, timeouts, relaying."""
