"""The Redis store: the embedded Valkey server and the client connection to any store."""

from gateway.store.client import connect_store, ping_store
from gateway.store.embedded import EmbeddedStore, EmbeddedStoreError

__all__ = ["EmbeddedStore", "EmbeddedStoreError", "connect_store", "ping_store"]
