"""What people run on checkpoints: the CLI (cli), ls/inspect as data (inspection), diff, export and import
(export, importers, safetensors_layout). Top layer: may import anything in the package."""
