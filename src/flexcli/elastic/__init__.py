"""The elastic model: importance ranking, permutation, slicing, and the static and input-adaptive runtimes."""
