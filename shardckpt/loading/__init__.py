"""Loading: load / load_full and key selection (load), fetch + decode + copy (reader), the read-once exchange
(exchange), the one verifier (verify), training-state adapters (state). May import saving and below."""
