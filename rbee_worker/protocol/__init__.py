"""Wire formats shared by the worker and its clients (keeper, queen, hive)."""
