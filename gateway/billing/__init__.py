"""Billing a call: its life from admission to settlement, and what may cut it short."""
