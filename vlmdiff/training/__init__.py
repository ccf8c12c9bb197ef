"""Training: the autoencoder stage, the diffusion stage, calibration and fine-tuning."""
