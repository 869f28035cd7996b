"""Command orchestrations: one module per `flex` command; none imports another."""
