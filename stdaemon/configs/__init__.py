"""Named training configs stored under the state directory."""
