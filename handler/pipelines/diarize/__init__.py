"""Who spoke when: the GE2E voice encoder (:mod:`.encoder`), clustering its embeddings of speech into
speakers (:mod:`.pipeline`), and those speakers put on a transcript's words and segments (:mod:`.labels`)."""
