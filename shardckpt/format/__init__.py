"""The on-disk format (docs/FORMAT.md): manifest and index records and their builders (records), the
validating parsers (parse), codec descriptors (codec), the flattening tree (tree), reference resolution
(refs) and the one metadata reader (metadata). May import: errors, config, native, storage."""
