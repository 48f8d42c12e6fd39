"""Lock backends: Redis, local files, and the hybrid of the two."""
