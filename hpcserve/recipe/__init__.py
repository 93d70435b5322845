"""Recipe schema and loading."""
