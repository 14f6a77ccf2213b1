"""Backbones built from Hugging Face configs, the NEZHA draft head, objectives, and the LightningModule."""
