"""RunPod serverless media worker: transcription and generation pipelines behind one handler."""

__version__ = "0.1.0"
