"""The control plane's reach into nodes: SSH (asyncssh) or local subprocesses, one interface."""
