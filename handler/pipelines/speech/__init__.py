"""Speech synthesis: transformers VITS / MMS-TTS class models."""
