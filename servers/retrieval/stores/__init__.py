"""Document stores: the interface every backend implements (`base`), the embedded SQLite default, Weaviate."""
