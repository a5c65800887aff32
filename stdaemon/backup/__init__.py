"""Database backups: online copies, scheduled backups, restore."""
