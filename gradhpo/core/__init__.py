"""Core types: the state, the abstract optimizer, type aliases."""
