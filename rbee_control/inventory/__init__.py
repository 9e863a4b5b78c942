"""The operator's `inventory.yaml`: its typed model, loader, editor and the keeper's secrets."""
