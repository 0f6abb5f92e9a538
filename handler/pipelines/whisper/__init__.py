"""The Whisper engine: the driver of a batched transcription (:mod:`.decoding`), the decoder it runs
(:mod:`.batch_task`, upstream's task batched), speech chunks (:mod:`.vad`), and the loaded model held
by one job at a time (:mod:`.pipeline`). Nothing here imports a task or a job."""
