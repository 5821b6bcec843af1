"""The admin API: accounts, top-ups, keys, subscriptions, usage. Every route needs the token."""

from gateway.admin.app import create_admin_app

__all__ = ["create_admin_app"]
