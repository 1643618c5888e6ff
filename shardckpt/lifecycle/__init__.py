"""A checkpoint's life on storage: the commit protocol (commit), step naming (layout) and the one deleter
(deleter: retention's retire, gc, pins). May import: errors, config, dist, native, storage, format, plan."""
