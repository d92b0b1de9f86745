"""Faust agents: thin loops that call the pure operators, write tables and send."""
