"""Prometheus metrics: figures kept in memory and the scrape surface."""
