"""Built-in conversion recipes (YAML), resolved by `flex convert NAME`."""
