"""deid domain."""
