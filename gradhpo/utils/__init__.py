"""Shared machinery: inner-step derivatives, tree helpers, validation."""
