"""rbee-worker: one GGUF model served over HTTP/SSE."""

#: The release of the whole `rbee` distribution (the package metadata reads it from here; the
#: control plane re-exports it, and keeper and hive compare it on every contact).
__version__ = "0.1.0"
