"""The hypergradient algorithms, one per module."""
