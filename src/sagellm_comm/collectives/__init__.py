"""Collective algorithms over point-to-point messages, and the rule that picks them."""
