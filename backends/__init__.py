"""Backends: one package per framework, each registering its Backend subclass (multisal.registry)."""
