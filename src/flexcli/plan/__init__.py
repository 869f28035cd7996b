"""Planning: budgets, and budget -> per-layer configuration (static router or importance search)."""
