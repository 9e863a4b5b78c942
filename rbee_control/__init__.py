"""rbee's control plane: inventory, SSH transport, rbee-keeper, rbee-hive and queen-rbee."""

#: The release, defined at the bottom of the house (`rbee_worker`) so every CLI can print it; keeper
#: and hive compare it on every contact, and a constant costs nothing at start-up.
from rbee_worker import __version__

__all__ = ["__version__"]
