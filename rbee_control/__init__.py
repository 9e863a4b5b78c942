"""rbee's control plane: inventory, SSH transport, rbee-keeper, rbee-hive and queen-rbee."""

#: The release; the package metadata reads it from here (keeper and hive compare it on every contact,
#: and a constant costs nothing at start-up, unlike asking `importlib.metadata`).
__version__ = "0.1.0"
