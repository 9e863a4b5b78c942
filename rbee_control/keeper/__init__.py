"""The operator's side: the `rbee-keeper` CLI and the node client the queen shares."""
