"""Entry points: the Hydra training app used by every launcher."""
