"""crypto domain."""
