"""Test kits for people building on shardckpt: storage.StorageConformance, the suite every Storage backend
must pass. Imported by test code only (it needs pytest); the library never imports it."""
