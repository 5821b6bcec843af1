"""The browser console at /console: server-rendered pages of the money, for operators (logged
in with the admin token) and account owners (logged in with one of their API keys)."""

from gateway.console.app import create_console_app

__all__ = ["create_console_app"]
