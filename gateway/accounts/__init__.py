"""Accounts: API keys and (later) the arrears lifecycle."""
