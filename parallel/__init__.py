"""Parallelism (DistZO2): mesh, perturbation parallelism, scalar DDP, slicing. See issue #4."""
