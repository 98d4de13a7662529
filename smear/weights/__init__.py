"""Shipped model folders."""
