"""Everything of BiT that does not depend on a deep-learning framework (numpy and stdlib only)."""
