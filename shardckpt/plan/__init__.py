"""Pure planning: boxes and overlaps (geometry), what each rank writes (save_plan), who fetches what in a
read-once restore (exchange_plan). No I/O, no process groups. May import: errors, format."""
