"""Training on source code: corpus, optax loop, JAX sharding, orbax checkpoints."""
