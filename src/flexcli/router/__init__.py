"""Routers: the models (static, input-adaptive, surrogate), their training, and their files."""
