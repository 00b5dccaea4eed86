"""Standalone trainer for IDAdapter and Inv-Adapter weights (diffusers host; see README)."""
