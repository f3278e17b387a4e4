"""A job's files: where a request names them, how the worker fetches and uploads them, what the job shows."""
