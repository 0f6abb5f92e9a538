"""The Whisper engine: decoding in batches (:mod:`.decoding`), speech chunks (:mod:`.vad`), and the
loaded model held by one job at a time (:mod:`.pipeline`). Nothing here imports a task or a job."""
