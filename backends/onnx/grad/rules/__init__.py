"""Gradient rules, grouped by what the ops are; importing a module registers its rules."""
