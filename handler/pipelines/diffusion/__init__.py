"""Model code for diffusers pipelines (images and video)."""
