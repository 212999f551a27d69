"""The cache's on-disk contract, which every other part of the room reads: the spec and its key, the
schema (storage_schemas/), manifest.json, shard files, the expert-state codecs. Nothing here runs a teacher
or Ray."""
