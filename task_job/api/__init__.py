"""The management API (docs/api.md): aiohttp routes over the same client and broker code the
CLI uses; no Redis key names of its own."""
