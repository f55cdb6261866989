"""Transports beyond the Redis list (README, Other transports): the pueue-NATS worker's
subjects (nats.py) and the gRPC task scheduler's service (grpc.py). Both are edges: they turn
what arrives into task messages through the same client code as the CLI and the API."""
