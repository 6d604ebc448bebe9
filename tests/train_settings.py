"""Settings-node inputs shared by the tests that drive the pack's nodes in-process (not the host's node_helpers)."""

# Inputs of the SD3 LoRA Settings node, sized for the tiny fixtures (a high lr shows learning in few steps).
SETTINGS = dict(network_dim=8, network_alpha=8.0, learning_rate=1e-3, train_batch_size=1, weighting_scheme="uniform",
                logit_mean=0.0, logit_std=1.0, mode_scale=1.29, training_shift=1.0, max_grad_norm=1.0,
                mixed_precision="no", seed=42)


def settings(N, **overrides):
    """A validated config from the real Settings node."""
    return N["SD3LoraSettings"]().build(**dict(SETTINGS, **overrides))[0]
