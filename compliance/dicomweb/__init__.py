"""dicomweb domain."""
